"""info / verify: what an index holds, and whether every block of it still decodes."""
from __future__ import annotations

from .config import factor_key_of_index
from .fit import CURVATURE_META, stored_preconditioner
from .whitening import WHITENING_META
from .progress import Progress
from .store import IndexReader, VerifyReport


def info(index) -> dict:
    """Settings, sizes, rows, layers and a spectrum summary of `index`, as a JSON-able dict."""
    with IndexReader(index) as reader, reader.snapshot() as snap:
        layout, settings = reader.layout, reader.settings
        curvature = snap.state_meta(CURVATURE_META) or {}
        whitening = snap.state_meta(WHITENING_META) or {}
        factors = factor_key_of_index(settings.get("factors") or {})
        disk = reader.disk_bytes()
        factor_bytes = reader.factor_bytes()
        layers = []
        for layer in layout.layers:
            c = curvature.get("layers", {}).get(layer.name, {})
            layers.append({
                "name": layer.name, "d_out": layer.d_out, "d_in": layer.d_in, "D": layer.D,
                "rank": c.get("rank"), "damping": c.get("damping"), "captured_energy": c.get("captured_energy"),
                "whitening": whitening.get("layers", {}).get(layer.name),
            })
        raw = layout.values_per_example() * {"bf16": 2, "fp16": 2, "fp32": 4}[layout.dtype]
        return {
            "index": str(reader.path),
            "rows": snap.rows,
            "layers": layers,
            "c": layout.c,
            "dtype": layout.dtype,
            "block_size": layout.block_size,
            "format_version": reader.format_version,
            "factors": settings.get("factors"),
            "projection": {"kind": factors.get("projection_kind"), "f": factors.get("f"),
                           "min_side": factors.get("min_side"), "matrices": factors.get("projection"),
                           "whiten_examples": whitening.get("examples"), "whiten_damping": whitening.get("rho"),
                           "whitened_layers": len(whitening.get("layers", {}))},
            "preconditioner": stored_preconditioner(curvature) if curvature else None,
            "segments": settings.get("segments"),
            "nonfinite_rows": len(settings.get("nonfinite_rows", [])),
            "curvature": {k: v for k, v in curvature.items() if k != "layers"},
            "disk_bytes": disk,
            "factor_bytes": factor_bytes,
            "bytes_per_example": factor_bytes / snap.rows if snap.rows else None,
            "raw_bytes_per_example": raw,
        }


def verify(index, progress: bool = True, max_errors: int = 20) -> VerifyReport:
    """Check every record: blocks (checksums, contiguity), ids both ways, metadata, arrays, LMDB's header.

    The walk runs in a child process: damaged LMDB pages can abort or fault inside LMDB itself,
    and that must be a line of the report, not the end of verify."""
    from .store.verify import run_isolated

    bars: list[Progress] = []

    def start(total: int):
        bars.append(Progress("verify", total=total, unit="rows", enabled=progress))
        return bars[-1].update

    try:
        return run_isolated(index, max_errors=max_errors, progress=start)
    finally:
        for bar in bars:
            bar.close()
