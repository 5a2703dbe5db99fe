"""Settings of each operation, as frozen dataclasses that validate themselves.

Every field carries its help text in `metadata["help"]`: the CLI builds its options from it, so
the Python API and the command line stay one thing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace

import psutil

# --hf-dtype: the built-in HF task's weight dtypes ("auto": the checkpoint's own). Here, not in
# task.py, so that the CLI lists them without importing torch.
HF_MODEL_DTYPES = ("fp32", "bf16", "fp16", "auto")

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_size(text: str | int | float) -> int:
    """'8GB', '512MiB', '1.5g', 123 -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"cannot read {text!r} as a size (examples: 8GB, 512MB, 1.5GiB)")
    unit = (m.group(2) or "").lower()
    base = unit[:1] if unit[:1] in "kmgt" and unit[:1] else ""
    mult = _UNITS[base] * ((1024 / 1000) ** "_kmgt".index(base) if "i" in unit and base else 1)
    return int(float(m.group(1)) * mult)


def default_memory_budget(device: str | None = None, device_free: int | None = None) -> int:
    """Half of the RAM available now: leaves room for the model, the OS and the page cache. On a
    CUDA device (`device` cuda, cuda:N, or auto with a GPU) also at most half of its free memory
    (`device_free` bytes, default torch.cuda.mem_get_info()): the same budget sizes what lives on
    the device (the query batch's preconditioned gradients, the sketches, the whitening moments),
    and a large-RAM host would otherwise size them past the GPU."""
    budget = int(psutil.virtual_memory().available * 0.5)
    if device_free is None:
        device_free = cuda_free_memory(device)
    return budget if device_free is None else min(budget, int(device_free * 0.5))


def cuda_free_memory(device: str | None) -> int | None:
    """Free bytes of the CUDA device `device` names, None for a CPU or where torch sees no GPU."""
    if device is None or str(device) == "cpu" or not (str(device) == "auto" or str(device).startswith("cuda")):
        return None
    import torch  # here, not at the top: the CLI reads this module without torch

    if not torch.cuda.is_available():
        return None
    index = None if str(device) == "auto" else torch.device(device).index
    return int(torch.cuda.mem_get_info(index)[0])


def budget_groups(sizes: list[int], share: int) -> list[list[int]]:
    """Positions of `sizes` in order, cut into runs whose sizes add up to at most `share` (one pass
    over the data per run); an item larger than `share` is a run of its own."""
    groups: list[list[int]] = []
    used = 0
    for i, need in enumerate(sizes):
        if groups and used + need <= share:
            groups[-1].append(i)
            used += need
        else:
            groups.append([i])
            used = need
    return groups


PROJECTION_KINDS = ("whitened", "random")
PRECONDITIONERS = ("ekfac", "lowrank", "none")


def default_preconditioner(projection_kind: str, tokens_per_example: float | None = None) -> str:
    """`auto`, resolved: the paper's low-rank curvature for random projections; for whitened ones
    EK-FAC on sequence data and a plain dot product on one-token data (None until the whitening
    pre-pass has counted the tokens).

    Measured (benchmarks/bench_quality.py, LDS): EK-FAC on top of whitening lowers the effective
    damping; on a GPT-2 text task that gains +0.02 to +0.05 at every (f, c), on two one-token MLPs
    (digits, breast cancer) it loses up to 0.06 and 0.14 against the dot product.
    """
    if projection_kind != "whitened":
        return "lowrank"
    if tokens_per_example is None:
        return "auto"
    return "ekfac" if tokens_per_example > 1.0 else "none"


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class CurvatureConfig:
    """How the per-layer curvature (A_l + λ_l I) is approximated."""

    sketch_rank: int = _opt(256, "r: eigenpairs kept per layer (clamped to min(r, D_l, N))")
    # Measured (benchmarks/bench_single_pass.py): gradient spectra decay slowly past r, and a
    # one-pass Nystrom sketch resolves the top r only with k ~ 4r columns.
    oversample: int | None = _opt(
        None, "extra sketch columns beyond r, k = r + oversample (default 3r, so k = 4r: single-pass scores then "
              "agree 0.9994 with exact top-r scores on the demo's trained GPT-2, 0.92 at r + 16; sketch memory is 2·D·k·4 bytes "
              "per layer, k clamped to D)")
    refine: int = _opt(0, "q: subspace-iteration passes over the stored factors after the sketch (0 = single pass)")
    damping_policy: str = _opt("eigen-mean", "λ_l = scale·mean(σ²) (eigen-mean) or scale·trace(A_l)/D_l (trace)",
                               choices=("eigen-mean", "trace"))
    damping_scale: float = _opt(0.1, "M, the scale of the damping policy")
    damping: float | None = _opt(None, "one explicit λ for every layer (overrides the policy)")
    sketch_seed: int = _opt(0, "seed of the Gaussian sketch test matrices")
    preconditioner: str = _opt(
        "auto", "how a query gradient is preconditioned before the dot product with the stored rows: ekfac = "
                "eigenvalue-corrected K-FAC in the projected space (needs whitened projections; a D-sized statistic "
                "per layer), lowrank = the paper's top-r eigenpairs of Σ g gᵀ + Woodbury (needs the D·k sketches), "
                "none = plain dot product; auto = for whitened projections ekfac on sequence data (more than one "
                "token per example in the whitening sample) and none on one-token data (measured best on each), "
                "lowrank for random ones",
        choices=PRECONDITIONERS + ("auto",))

    def __post_init__(self):
        if self.preconditioner not in PRECONDITIONERS + ("auto",):
            raise ValueError(f"preconditioner={self.preconditioner!r} is not one of {', '.join(PRECONDITIONERS)}, auto")
        if self.sketch_rank < 1:
            raise ValueError(f"sketch_rank={self.sketch_rank} must be >= 1")
        if self.oversample is None:
            # Resolved here, not at use: the index stores the number, so a later change of the
            # default never reinterprets an existing index's sketches.
            object.__setattr__(self, "oversample", 3 * self.sketch_rank)
        if self.oversample < 0:
            raise ValueError(f"oversample={self.oversample} must be >= 0")
        if self.refine < 0:
            raise ValueError(f"refine={self.refine} must be >= 0")
        if self.damping_policy not in ("eigen-mean", "trace"):
            raise ValueError(f"damping_policy={self.damping_policy!r} is not one of eigen-mean, trace")
        if not self.damping_scale > 0:
            raise ValueError(f"damping_scale={self.damping_scale} must be > 0")
        if self.damping is not None and not self.damping > 0:
            raise ValueError(f"damping={self.damping} must be > 0")

    def resolved(self, projection_kind: str, tokens_per_example: float | None = None) -> "CurvatureConfig":
        """This config with `auto` replaced by the default for the index (what it stores); whitened
        indexes stay `auto` until their pre-pass has measured `tokens_per_example`."""
        if self.preconditioner == "auto":
            return replace(self, preconditioner=default_preconditioner(projection_kind, tokens_per_example))
        if self.preconditioner == "ekfac" and projection_kind != "whitened":
            raise ValueError("preconditioner=ekfac needs whitened projections (projection_kind=whitened): "
                             "its eigenbasis comes from the whitening statistics")
        return self

    @property
    def sketch_width(self) -> int:
        return self.sketch_rank + self.oversample

    def sketch_key(self) -> dict:
        """What determines the sketch itself (changing it needs a fresh pass over the factors)."""
        return {"k": self.sketch_width, "sketch_seed": self.sketch_seed}


@dataclass(frozen=True)
class BuildConfig:
    """How training examples become index rows."""

    f: int = _opt(4, "projection factor: each side of a layer is projected to d = min(dim, max(dim // f, min_side)) "
                     "(1 = no projection, exact gradients)")
    rank: int = _opt(1, "c, rank of the stored per-example factors")
    projection_kind: str = _opt(
        "whitened", "whitened = whiten each side with its K-FAC factor (A_in, A_out from a pre-pass over "
                    "--whiten-examples training examples) before the random projection, so dot products approximate "
                    "K-FAC influence and rank-c truncation happens in that metric; random = the LoRIF paper's plain "
                    "random projections", choices=PROJECTION_KINDS)
    min_side: int = _opt(32, "no side of a layer is projected below this many dimensions; sides of at most this "
                             "size are kept whole (1 = the paper's max(1, dim // f))")
    # 256: a Llama-3-8B shape stores 230 KB per example (c=1, bf16) and ~1.3 GB of projections; no
    # layer of bench_quality's models is cut by it at f >= 2 (their widest side is 512)
    max_side: int = _opt(256, "no side of a layer is projected above this many dimensions (f >= 2), so the bytes per "
                              "example stay bounded as layers widen: a 152k-token LM head keeps 256, not 38k "
                              "(0 = no cap, d = dim // f)")
    max_dense_side: int | None = _opt(
        8192, "sides wider than this (an LM head's vocabulary, a 14k MLP) get a structured CountSketch projection "
              "(O(dim) per token, two dim-long vectors of state) with diagonal whitening, instead of a dense dim x d "
              "matrix and a dim x dim eigendecomposition")
    # 512: digits LDS 0.667 vs 0.672 at 1000 and 0.638 at 256; text 0.281 at 128 vs 0.283 at 400
    whiten_examples: int = _opt(512, "training examples (evenly spaced over the set; all if fewer) whose token "
                                     "moments give the whitening")
    whiten_damping: float = _opt(0.1, "ρ: each side is whitened by (A + ρ·mean(eig A)·I)^-1/2")
    projection: str = _opt("rademacher", "entries of the random projection matrices", choices=("rademacher", "gaussian"))
    seed: int = _opt(0, "seed of the projection matrices")
    dtype: str = _opt("bf16", "storage dtype of the factors", choices=("bf16", "fp16", "fp32"))
    block_size: int | None = _opt(None, "examples per stored block (default: sized to ~32 MB of factors)")
    batch_size: int = _opt(8, "examples per forward/backward pass")
    device: str = _opt("auto", "torch device (auto = cuda when available, else cpu)")
    memory_budget: int | None = _opt(None, "RAM the engine may use, e.g. 8GB (default: half the available RAM)")
    zstd_level: int = _opt(1, "zstd compression level (1 is the fastest and, on gradient bytes, about as small)")
    durability: str = _opt("nosync", "sync = fsync every block (survives power loss); nosync = survives crashes of "
                           "the process, fsync at the end", choices=("sync", "nosync"))
    skip_nonfinite: bool = _opt(False, "store zero factors for examples with NaN/inf gradients (recorded) instead of stopping")
    allow_duplicate_ids: bool = _opt(False, "accept example ids that are already in the index")
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig, metadata={"help": "curvature settings"})

    def __post_init__(self):
        if self.f < 1:
            raise ValueError(f"f={self.f} must be >= 1")
        if self.rank < 1:
            raise ValueError(f"rank={self.rank} must be >= 1")
        if self.projection not in ("rademacher", "gaussian"):
            raise ValueError(f"projection={self.projection!r} is not one of rademacher, gaussian")
        if self.dtype not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"dtype={self.dtype!r} is not one of bf16, fp16, fp32")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size={self.block_size} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ValueError(f"memory_budget={self.memory_budget} must be > 0")
        if self.projection_kind not in PROJECTION_KINDS:
            raise ValueError(f"projection_kind={self.projection_kind!r} is not one of {', '.join(PROJECTION_KINDS)}")
        if self.min_side < 1:
            raise ValueError(f"min_side={self.min_side} must be >= 1")
        if self.max_side != 0 and self.max_side < self.min_side:
            raise ValueError(f"max_side={self.max_side} must be >= min_side={self.min_side} (or 0: no cap)")
        if self.max_dense_side is not None and self.max_dense_side < 1:
            raise ValueError(f"max_dense_side={self.max_dense_side} must be >= 1")
        if self.whiten_examples < 1:
            raise ValueError(f"whiten_examples={self.whiten_examples} must be >= 1")
        if not self.whiten_damping > 0:
            raise ValueError(f"whiten_damping={self.whiten_damping} must be > 0")
        object.__setattr__(self, "curvature", self.curvature.resolved(self.projection_kind))

    def budget(self) -> int:
        return self.memory_budget or default_memory_budget(self.device)

    def factor_key(self) -> dict:
        """Settings that determine the stored factors: a resume or append must match them exactly."""
        key = {"f": self.f, "rank": self.rank, "projection": self.projection, "seed": self.seed, "dtype": self.dtype,
               "projection_kind": self.projection_kind, "min_side": self.min_side, "max_side": self.max_side or None,
               "max_dense_side": self.max_dense_side}
        if self.projection_kind == "whitened":
            key.update(whiten_examples=self.whiten_examples, whiten_damping=self.whiten_damping)
        return key


def factor_key_of_index(stored: dict) -> dict:
    """An index's stored factor settings, with what format versions 1 and 2 left implicit made
    explicit: version 1 had neither whitening nor min_side, neither had max_side nor sketched sides."""
    return {"projection_kind": "random", "min_side": 1, "max_side": None, "max_dense_side": None, **stored}


FACTOR_FIELDS = ("f", "rank", "projection", "seed", "dtype", "projection_kind", "min_side", "max_side",
                 "max_dense_side", "whiten_examples", "whiten_damping")


def factor_options(stored: dict) -> dict:
    """BuildConfig keyword options that reproduce an index's stored factor settings (append uses them)."""
    options = {k: v for k, v in factor_key_of_index(stored).items() if k in FACTOR_FIELDS}
    options["max_side"] = options["max_side"] or 0
    return options


@dataclass(frozen=True)
class QueryConfig:
    """How queries are scored against the index."""

    top_k: int = _opt(10, "proponents and opponents kept per query")
    batch_size: int = _opt(8, "query examples per forward/backward pass")
    device: str = _opt("auto", "torch device (auto = cuda when available, else cpu)")
    memory_budget: int | None = _opt(None, "RAM the query may use, e.g. 4GB (default: half the available RAM)")
    layers: tuple[str, ...] | None = _opt(None, "restrict scoring to these layers (regex per entry)")
    buffers: int = _opt(2, "decoded blocks in flight between the loader and the scorer")
    loader_threads: int = _opt(1, "threads decoding blocks while the scorer works (0 = decode inline)")
    scorer: str = _opt("auto", "factored: c·D per example per query; dense: rebuild g_i (c·D) then Q·D; auto: cheaper",
                       choices=("auto", "factored", "dense"))
    rerank: int = _opt(0, "rescore each query's top-K and bottom-K rows at full dimension (the task's model recomputes "
                          "their gradients; needs its training examples) and re-choose the top-k among them; 0 = off. "
                          "100: top-10 overlap with Kronfluence EK-FAC 0.49 -> 0.83 on text (docs/BENCHMARKS.md)")

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.buffers < 1:
            raise ValueError(f"buffers={self.buffers} must be >= 1")
        if self.loader_threads < 0:
            raise ValueError(f"loader_threads={self.loader_threads} must be >= 0")
        if self.scorer not in ("auto", "factored", "dense"):
            raise ValueError(f"scorer={self.scorer!r} is not one of auto, factored, dense")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ValueError(f"memory_budget={self.memory_budget} must be > 0")
        if not isinstance(self.rerank, int) or isinstance(self.rerank, bool) or self.rerank < 0:
            raise ValueError(f"rerank={self.rerank!r} must be an int >= 0")

    def budget(self) -> int:
        return self.memory_budget or default_memory_budget(self.device)

    def kept(self) -> int:
        """Proponents and opponents the streaming pass keeps per query: top_k, or the rerank's K if more."""
        return max(self.top_k, self.rerank)


def option_help(cls, name: str) -> str:
    for f in fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)
