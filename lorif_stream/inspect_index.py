"""info / verify: what an index holds, and whether every block of it still decodes."""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from .config import factor_key_of_index
from .fit import CURVATURE_META, stored_preconditioner
from .whitening import WHITENING_META
from .progress import Progress
from .store import IndexReader, VerifyReport
from .store.shards import check_manifest_against_shards, is_sharded, open_index, read_manifest


def info(index) -> dict:
    """Settings, sizes, rows, layers and a spectrum summary of `index`, as a JSON-able dict."""
    with open_index(index) as reader, reader.snapshot() as snap:
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
            "shards": settings.get("shards", 0),
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
        if is_sharded(index):
            return _verify_shards(Path(index), max_errors, start)
        return run_isolated(index, max_errors=max_errors, progress=start)
    finally:
        for bar in bars:
            bar.close()


def _verify_shards(path: Path, max_errors: int, start) -> VerifyReport:
    """Each shard verified as the complete index it is, the manifest against the shards, and the ids
    unique across shards (each shard's own LMDB sees only its rows)."""
    from .comm import LOCAL
    from .shard_ids import first_duplicate
    from .store.verify import run_isolated

    manifest = read_manifest(path)
    report = VerifyReport(rows=0, errors=list(check_manifest_against_shards(path).errors))
    present = [e for e in manifest.shards if (path / e.name / "data.mdb").exists()]
    for entry in present:
        try:
            shard = run_isolated(path / entry.name, max_errors=max_errors, progress=start)
        except Exception as e:  # a shard that cannot be opened at all is a line of this report
            report.errors.append(f"shard {entry.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        report.rows += shard.rows
        report.blocks += shard.blocks
        report.errors += [f"shard {entry.name}: {e}" for e in shard.errors]
    if report.errors:
        return report  # ids of damaged shards would only add noise
    with ExitStack() as stack:
        sources, allowed = [], False
        for entry in present:
            reader = stack.enter_context(IndexReader(path / entry.name))
            allowed = allowed or bool(reader.settings.get("allow_duplicate_ids"))
            sources.append((entry.start, stack.enter_context(reader.snapshot())))
        duplicate = None if allowed else first_duplicate(LOCAL, sources)
    if duplicate is not None:
        name, row, earlier = duplicate
        report.errors.append(f"example id {name!r} is at rows {earlier} and {row}, in two places across shards")
    return report
