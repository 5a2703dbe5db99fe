"""Capture benchmark: the memory and time the gradient capture adds to one forward+backward.

A randomly initialised GPT-2-small-shaped model (12 layers x 768, vocab 50,257, built from a
config, no download), random tokens, sequence 256, batch 4, its 48 block Conv1D layers tracked
at the default projection (f=4, min_side 32). Three ways to run one step on the same batch:

  * plain:   ``loss.backward()`` -- what training does, parameter gradients included (the floor
             users know);
  * bare:    the same backward but with no parameter gradient (``autograd.grad`` to the input
             embeddings): the strict floor, since the capture forms no parameter gradient either;
  * capture: ``GradientCapture.projected_gradients`` -- per-example projected gradients of every
             tracked layer, each layer's output gradient consumed inside the backward;
  * held:    the previous design, for comparison: ``autograd.grad`` to every tracked output, so
             all their output gradients are alive at once before being projected.

Peak memory: each mode runs once in a fresh subprocess; extra = kernel high-water RSS
(``ru_maxrss``) minus the RSS just before the step (model and batch resident). The subprocess
serves every allocation above 64 KB with its own mmap (``MALLOC_MMAP_THRESHOLD_``), so a freed
buffer leaves RSS at once and the high-water mark is the live bytes, not allocator caching. It is compared
with one layer's output gradient Δ (B·T·O fp32 of the widest tracked layer) and with the bytes
of the capture's result (B·Σ d_out·d_in fp32, what the caller receives). Time: the modes
alternate in one process, median of the repeats.

    python benchmarks/bench_capture.py             # GPT-2-small shape, seq 256, batch 4
    python benchmarks/bench_capture.py --quick     # 2 layers x 128, seq 64 (seconds)
    python benchmarks/bench_capture.py --device cuda   (peak = torch.cuda.max_memory_allocated)
Writes benchmarks/results/capture[_quick][_cuda].json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from lorif_stream.capture import GradientCapture, tracked_layers
from lorif_stream.projection import ProjectionSpec, make_projections

SHAPES = {
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, vocab=50257, seq=256, batch=4),
    "quick": dict(n_layer=2, n_embd=128, n_head=4, vocab=512, seq=64, batch=4),
}
TRACKED = r"^transformer\.h\."
MODES = ("plain", "bare", "capture", "held")


def build(shape: dict, device: torch.device):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=shape["n_layer"], n_embd=shape["n_embd"], n_head=shape["n_head"],
                     vocab_size=shape["vocab"], n_positions=shape["seq"], bos_token_id=0, eos_token_id=0,
                     attn_implementation="eager")
    model = GPT2LMHeadModel(cfg).to(device).eval()
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=torch.Generator().manual_seed(1))
    return model, ids.to(device)


def per_example_losses(model, ids, embeds=None):
    out = model(input_ids=None if embeds is not None else ids, inputs_embeds=embeds)
    logits = out.logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return ce.sum(dim=1)


class Runner:
    def __init__(self, shape: dict, device: torch.device):
        self.model, self.ids = build(shape, device)
        self.layers = tracked_layers(self.model, TRACKED, 4, 32)
        self.projections = make_projections(self.layers, ProjectionSpec(f=4, min_side=32), device)

    def step(self, mode: str) -> None:
        model = self.model
        if mode == "plain":
            per_example_losses(model, self.ids).sum().backward()
            model.zero_grad(set_to_none=True)
        elif mode == "bare":
            embeds = model.transformer.wte(self.ids).detach().requires_grad_(True)
            torch.autograd.grad(per_example_losses(model, self.ids, embeds).sum(), [embeds])
        elif mode == "capture":
            with GradientCapture(model, self.layers, self.projections) as cap:
                cap.projected_gradients(per_example_losses(model, self.ids))
        else:
            self._held_deltas_step()

    def _held_deltas_step(self) -> None:
        """The previous capture: every tracked output's Δ returned at once, then projected."""
        modules = dict(self.model.named_modules())
        kept, outputs = [], []

        def hook(name):
            def keep(module, args, output):
                kept.append((name, self.projections[name].project_in(args[0].detach())))
                outputs.append(output)
            return keep

        handles = [modules[l.name].register_forward_hook(hook(l.name)) for l in self.layers]
        try:
            losses = per_example_losses(self.model, self.ids)
            deltas = torch.autograd.grad(losses.sum(), outputs)
            B = losses.shape[0]
            with torch.no_grad():
                for (name, xp), delta in zip(kept, deltas):
                    proj = self.projections[name]
                    dp = proj.project_out(delta).reshape(B, -1, proj.d_out)
                    torch.bmm(dp.transpose(1, 2), xp.reshape(B, -1, proj.d_in))
        finally:
            for h in handles:
                h.remove()

    def sizes(self, shape: dict) -> dict:
        B, T = shape["batch"], shape["seq"]
        widest = max(self.layers, key=lambda l: l.out_features)
        return {
            "layer_delta_bytes": B * T * widest.out_features * 4,
            "widest_layer": widest.name,
            "result_bytes": B * sum(l.D for l in self.layers) * 4,
            "tracked_layers": len(self.layers),
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak(shape_name: str, mode: str, device: str) -> int:
    """Run in a fresh interpreter: the peak bytes one step of `mode` adds."""
    code = (
        "import sys, json; sys.path.insert(0, %r); import bench_capture as b\n"
        "print(json.dumps(b._peak_here(%r, %r, %r)))" % (str(Path(__file__).parent), shape_name, mode, device)
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _peak_here(shape_name: str, mode: str, device: str) -> int:
    torch.set_num_threads(max(1, psutil.cpu_count(logical=False) or 1))
    dev = torch.device(device)
    runner = Runner(SHAPES[shape_name], dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        runner.step(mode)
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - before
    before = psutil.Process().memory_info().rss
    runner.step(mode)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def measure_time(runner: Runner, device: torch.device, repeats: int) -> dict:
    for mode in MODES:  # warm-up: allocator, kernels, projection caches
        runner.step(mode)
    times = {m: [] for m in MODES}
    for _ in range(repeats):
        for mode in MODES:  # interleaved, so drift on a shared machine hits every mode alike
            _sync(device)
            t = time.perf_counter()
            runner.step(mode)
            _sync(device)
            times[mode].append(time.perf_counter() - t)
    return {m: statistics.median(v) for m, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 layers x 128 wide, seq 64: seconds")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    shape_name = "quick" if args.quick else "gpt2-small"
    shape = SHAPES[shape_name]
    device = torch.device(args.device)
    torch.set_num_threads(max(1, psutil.cpu_count(logical=False) or 1))

    peaks = {m: measure_peak(shape_name, m, args.device) for m in MODES}
    runner = Runner(shape, device)
    seconds = measure_time(runner, device, args.repeats)
    sizes = runner.sizes(shape)
    delta = sizes["layer_delta_bytes"]
    result = {
        "shape": {"name": shape_name, **shape},
        "device": args.device,
        "machine": {"cpus": psutil.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "projection": {"f": 4, "min_side": 32, "tracked": TRACKED},
        **sizes,
        "peak_extra_bytes": peaks,
        "capture_minus_plain_bytes": peaks["capture"] - peaks["plain"],
        "capture_minus_bare_bytes": peaks["capture"] - peaks["bare"],
        "capture_minus_bare_in_layer_deltas": (peaks["capture"] - peaks["bare"]) / delta,
        "capture_minus_bare_less_result_in_layer_deltas": (peaks["capture"] - peaks["bare"] - sizes["result_bytes"]) / delta,
        "seconds_per_step": seconds,
        "capture_over_plain": seconds["capture"] / seconds["plain"],
        "capture_over_bare": seconds["capture"] / seconds["bare"],
        "held_minus_bare_bytes": peaks["held"] - peaks["bare"],
    }
    mb = 1 << 20
    print(f"{shape_name} on {args.device}: batch {shape['batch']} x seq {shape['seq']}, "
          f"{sizes['tracked_layers']} tracked layers; one layer's Δ ({sizes['widest_layer']}) = {delta / mb:.1f} MB, "
          f"capture result = {sizes['result_bytes'] / mb:.1f} MB")
    for m in MODES:
        print(f"  {m:8s} peak +{peaks[m] / mb:8.1f} MB   {seconds[m] * 1e3:8.1f} ms/step")
    print(f"  capture - plain = {result['capture_minus_plain_bytes'] / mb:+.1f} MB; capture - bare = "
          f"{result['capture_minus_bare_bytes'] / mb:+.1f} MB = {result['capture_minus_bare_in_layer_deltas']:.2f} layer-Δ "
          f"({result['capture_minus_bare_less_result_in_layer_deltas']:.2f} beyond the result itself)")
    print(f"  previous design (all Δ held): held - bare = {result['held_minus_bare_bytes'] / mb:+.1f} MB")
    print(f"  time: capture / plain = {result['capture_over_plain']:.2f}x, capture / bare = {result['capture_over_bare']:.2f}x")
    name = "capture" + ("_quick" if args.quick else "") + ("_cuda" if device.type == "cuda" else "")
    out = Path(__file__).parent / "results" / f"{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
