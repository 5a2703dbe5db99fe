"""What an index holds: its layers' factor shapes, rank, storage dtype and block size."""
from __future__ import annotations

from dataclasses import dataclass

from .codec import DTYPE_CODES


@dataclass(frozen=True)
class LayerShape:
    """One tracked layer as the store sees it: factors L (d_out, c) and R (d_in, c) per example."""

    name: str
    d_out: int
    d_in: int

    def __post_init__(self):
        if not self.name:
            raise ValueError("layer name must be non-empty")
        if self.d_out < 1 or self.d_in < 1:
            raise ValueError(f"layer {self.name!r}: d_out={self.d_out}, d_in={self.d_in} must be >= 1")

    @property
    def D(self) -> int:
        return self.d_out * self.d_in


@dataclass(frozen=True)
class IndexLayout:
    layers: tuple[LayerShape, ...]
    c: int
    dtype: str = "bf16"
    block_size: int = 4096
    zstd_level: int = 1

    def __post_init__(self):
        if not self.layers:
            raise ValueError("an index needs at least one layer")
        if len(self.layers) >= 1 << 16:
            raise ValueError(f"{len(self.layers)} layers exceed the 65535 a u16 key can address")
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate layer names in {names}")
        if self.c < 1:
            raise ValueError(f"rank c={self.c} must be >= 1")
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(DTYPE_CODES)}")
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size} must be >= 1")

    def layer_index(self, name: str) -> int:
        for i, layer in enumerate(self.layers):
            if layer.name == name:
                return i
        raise KeyError(f"layer {name!r} is not in this index (it has {[l.name for l in self.layers]})")

    def values_per_example(self) -> int:
        return sum(self.c * (layer.d_out + layer.d_in) for layer in self.layers)

    def to_dict(self) -> dict:
        return {
            "layers": [{"name": l.name, "d_out": l.d_out, "d_in": l.d_in} for l in self.layers],
            "c": self.c,
            "dtype": self.dtype,
            "block_size": self.block_size,
            "zstd_level": self.zstd_level,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "IndexLayout":
        return cls(
            layers=tuple(LayerShape(**l) for l in d["layers"]),
            c=int(d["c"]),
            dtype=d["dtype"],
            block_size=int(d["block_size"]),
            zstd_level=int(d["zstd_level"]),
        )
