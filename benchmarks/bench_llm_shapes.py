"""Real LLM widths on a CPU: GPT-2-small, Qwen2-0.5B and Llama-3-8B shapes at the default settings.

Two parts:

1. **Full depth, on paper** (models built on torch's meta device: shapes only, no memory): per-side
   d of each layer type, bytes per example, projection state and stored state of the default
   build for the real layer counts, from the engine's own estimate (lorif_stream/estimate.py).
2. **Measured, fewer blocks** (full widths, full vocabulary, LM head tracked, random weights,
   random tokens): each run in a fresh process, side by side in one invocation --
   * plain: the floor, a batched forward + loss.backward() with parameter gradients (time);
   * bare: forward + backward with no parameter gradient (the model's own peak RSS in a backward
     like the build's, which forms no parameter gradient);
   * build: the default `ls.build` (time, split into the whitening pre-pass and the rows; peak RSS;
     index size);
   then estimated vs measured: disk (the index), engine RAM (build peak - bare peak), and the build's
   peak RSS predicted phase by phase from the estimate's parts and the model's own footprint
   (:func:`predicted_peak`): the pre-pass's eigendecompositions run after its last batch, when the
   model's activations are freed, so the announced engine RAM can exceed build peak - bare peak.

    python benchmarks/bench_llm_shapes.py --quick     # 1 block, N = 16 (gpt2, qwen2) / 8 (llama)
    python benchmarks/bench_llm_shapes.py             # 1 block, N = 64 / 24
Writes benchmarks/results/llm_shapes[_quick].json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _memory import PeakRSS  # noqa: E402

import lorif_stream as ls  # noqa: E402

SHAPES = {
    # name: (transformers config class, config kwargs at full depth, blocks measured, tokens, batch)
    "gpt2-small": ("GPT2Config", dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257), 1, 64, 4),
    "qwen2-0.5b": ("Qwen2Config", dict(num_hidden_layers=24, hidden_size=896, intermediate_size=4864,
                                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                       tie_word_embeddings=True), 1, 64, 4),
    "llama-3-8b": ("LlamaConfig", dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256), 1, 64, 2),
}
DEPTH_KEY = {"GPT2Config": "n_layer", "Qwen2Config": "num_hidden_layers", "LlamaConfig": "num_hidden_layers"}


def make_model(shape: str, blocks: int | None, device: str | None = None):
    import transformers

    cls_name, kwargs, measured, tokens, _ = SHAPES[shape]
    kwargs = dict(kwargs, **({DEPTH_KEY[cls_name]: blocks} if blocks else {}))
    config = getattr(transformers, cls_name)(**kwargs, attn_implementation="eager")
    if cls_name == "GPT2Config":
        config.n_positions = max(tokens, 64)
    torch.manual_seed(0)
    if device == "meta":
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(config)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


class ShapeTask:
    """Random token sequences through a random model of one of SHAPES (every Linear/Conv1D tracked,
    the LM head included, as the built-in HF task does)."""

    tracked_modules = None

    def __init__(self, shape: str, n: int):
        self.shape, self.n = shape, n
        _, kwargs, self.blocks, self.tokens, _ = SHAPES[shape]
        self.vocab = kwargs["vocab_size"]
        self._model = None

    def model(self):
        if self._model is None:
            self._model = make_model(self.shape, self.blocks)
        return self._model

    def train_examples(self):
        return list(range(self.n))

    def query_examples(self):
        return list(range(4))

    def collate(self, rows):
        return torch.stack([torch.randint(0, self.vocab, (self.tokens,), generator=torch.Generator().manual_seed(7 + r))
                            for r in rows])

    def loss(self, model, batch):
        logits = model(input_ids=batch).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                                               reduction="none")
        return ce.view(batch.shape[0], -1).sum(1)


# ------------------------------------------------------------------------------------ on paper


def full_depth(shape: str) -> dict:
    """The default build's sizes at the real depth, from the engine's estimate (no weights allocated)."""
    from lorif_stream.capture import tracked_layers
    from lorif_stream.estimate import estimate_build, projection_bytes, stored_state_bytes
    from lorif_stream.projection import ProjectionSpec
    from lorif_stream.store import IndexLayout, LayerShape

    config = ls.BuildConfig()
    spec = ProjectionSpec.from_factors(config.factor_key())
    model = make_model(shape, None, device="meta")
    layers = tracked_layers(model, None, config.f, config.min_side, config.max_side)
    layout = IndexLayout(tuple(LayerShape(l.name, l.d_out, l.d_in) for l in layers), c=config.rank, dtype=config.dtype,
                         block_size=256)
    est = estimate_build(layers, spec, config.__class__(memory_budget=64 << 30), layout, 1_000_000, SHAPES[shape][3])
    kinds = {}
    for l in layers:
        kind = l.name.split(".")[-1]
        kinds.setdefault(kind, f"{l.in_features}->{l.out_features}: d_in {l.d_in}, d_out {l.d_out}")
    return {"layers": len(layers), "sides": kinds,
            "bytes_per_example_raw": layout.values_per_example() * 2,
            "projection_state_MB": projection_bytes(layers, spec, True) / 1e6,
            "stored_state_MB": stored_state_bytes(layers, spec, config) / 1e6,
            "index_GB_per_million_examples": est.disk_parts["factors"] / 1e9,
            "sketched_sides": sum(spec.sketched(d) for l in layers for d in (l.in_features, l.out_features))}


# ------------------------------------------------------------------------------------ measured


def child(mode: str, shape: str, n: int, index: str) -> dict:
    """One measurement in this (fresh) process."""
    task = ShapeTask(shape, n)
    batch_size = SHAPES[shape][4]
    model = task.model()
    with PeakRSS() as rss:
        t = time.perf_counter()
        if mode == "plain":
            for s in range(0, n, batch_size):
                model.zero_grad(set_to_none=True)
                task.loss(model, task.collate(list(range(s, min(n, s + batch_size))))).sum().backward()
        elif mode == "bare":
            # the build's backward forms no parameter gradient: gradients w.r.t. the embeddings only
            for p in model.parameters():
                p.requires_grad_(False)
            hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_())
            for s in range(0, n, batch_size):
                task.loss(model, task.collate(list(range(s, min(n, s + batch_size))))).sum().backward()
            hook.remove()
        else:
            result = ls.build(task, index, batch_size=batch_size, device="cpu", progress=False)
        seconds = time.perf_counter() - t
    out = {"seconds": seconds, "peak_rss_MB": rss.peak / 1e6, "base_rss_MB": rss.base / 1e6}
    if mode == "build":
        info = ls.info(index)
        out.update(whiten_s=result.whiten_seconds, rows_s=result.seconds - result.whiten_seconds,
                   disk_MB=info["disk_bytes"] / 1e6, factor_MB=info["factor_bytes"] / 1e6,
                   estimate=estimate_of(task, index, batch_size))
    return out


def estimate_of(task: ShapeTask, index: str, batch_size: int) -> dict:
    """What the build announced, recomputed from the index's own layers and layout."""
    from lorif_stream.capture import LayerInfo
    from lorif_stream.estimate import estimate_build, tokens_bound
    from lorif_stream.projection import ProjectionSpec
    from lorif_stream.store import IndexReader

    config = ls.BuildConfig(batch_size=batch_size, device="cpu")
    with IndexReader(index) as reader:
        layers = [LayerInfo.from_dict(d) for d in reader.settings["layers"]]
        layout = reader.layout
    spec = ProjectionSpec.from_factors(config.factor_key())
    est = estimate_build(layers, spec, config, layout, task.n, tokens_bound(task, task.train_examples(), batch_size))
    return {"disk_MB": est.disk / 1e6, "ram_MB": est.ram / 1e6, "parts_MB": {k: v / 1e6 for k, v in est.ram_parts.items()}}


def run_child(mode: str, shape: str, n: int, index: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, shape, str(n), index], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if out.returncode != 0:
        raise RuntimeError(f"{mode} {shape} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(shape: str, n: int, root: Path) -> dict:
    index = str(root / shape)
    plain = run_child("plain", shape, n, index)
    bare = run_child("bare", shape, n, index)
    build = run_child("build", shape, n, index)
    engine_ram = build["peak_rss_MB"] - bare["peak_rss_MB"]
    est = build["estimate"]
    peak = predicted_peak(est["parts_MB"], base=build["base_rss_MB"], model_peak=bare["peak_rss_MB"])
    return {"N": n, "plain": plain, "bare": bare, "build": build,
            "build_over_plain": build["seconds"] / plain["seconds"],
            "rows_over_plain": build["rows_s"] / plain["seconds"],
            "engine_ram_MB": engine_ram, "estimated_ram_MB": est["ram_MB"],
            "ram_estimate_over_measured": est["ram_MB"] / engine_ram if engine_ram > 0 else None,
            "predicted_peak_rss_MB": peak, "peak_estimate_over_measured": peak / build["peak_rss_MB"],
            "disk_estimate_over_measured": est["disk_MB"] / build["disk_MB"]}


def predicted_peak(parts: dict, base: float, model_peak: float) -> float:
    """The build's peak RSS from the estimate's parts, phase by phase: the pre-pass's batches (the
    model's own peak + moments), its eigendecompositions (after its last batch: the model's weights +
    moments + the largest solver) and the rows (the model's own peak + curvature, batch, blocks)."""
    projections = parts["projections"]
    return max(model_peak + projections + parts["moments"],
               base + projections + parts["moments"] + parts["eigendecomposition"],
               model_peak + projections + parts["curvature"] + parts["batch"] + parts["blocks"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--child", nargs=4, metavar=("MODE", "SHAPE", "N", "INDEX"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, shape, n, index = args.child
        print(json.dumps(child(mode, shape, int(n), index)))
        return
    results = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
               "defaults": {k: v for k, v in ls.BuildConfig().factor_key().items()}, "shapes": {}}
    for shape in args.shapes:
        n = (16 if args.quick else 64) if shape != "llama-3-8b" else (8 if args.quick else 24)
        paper = full_depth(shape)
        print(f"{shape}: full depth {paper}", flush=True)
        with tempfile.TemporaryDirectory(prefix="llm-shapes-") as tmp:
            measured = measure(shape, n, Path(tmp))
        results["shapes"][shape] = {"full_depth": paper, "measured": measured}
        m = measured
        print(f"  N={n}: build {m['build']['seconds']:.1f} s (pre-pass {m['build']['whiten_s']:.1f}, rows "
              f"{m['build']['rows_s']:.1f}) vs plain {m['plain']['seconds']:.1f} s: {m['build_over_plain']:.2f}x, rows "
              f"{m['rows_over_plain']:.2f}x; engine RAM {m['engine_ram_MB']:.0f} MB vs estimated "
              f"{m['estimated_ram_MB']:.0f} MB ({m['ram_estimate_over_measured']:.2f}x); peak RSS {m['build']['peak_rss_MB']:.0f} MB "
              f"vs predicted {m['predicted_peak_rss_MB']:.0f} MB ({m['peak_estimate_over_measured']:.2f}x); disk {m['build']['disk_MB']:.1f} MB "
              f"vs estimated {m['build']['estimate']['disk_MB']:.1f} MB; build peak RSS {m['build']['peak_rss_MB']:.0f} MB",
              flush=True)
    out = Path(__file__).parent / "results" / f"llm_shapes{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
