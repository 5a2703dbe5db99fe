"""The CLI with the built-in HF causal-LM task on a tiny saved GPT-2 and jsonl files."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers_models import CORPUS, save_tiny_hf_model  # noqa: E402


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "lorif_stream.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    model = save_tiny_hf_model(d / "model")
    with open(d / "train.jsonl", "w") as fh:
        for i, text in enumerate(CORPUS * 3):
            fh.write(json.dumps({"doc": f"d{i}", "text": text}) + "\n")
    with open(d / "queries.jsonl", "w") as fh:
        for i, text in enumerate(CORPUS[:3]):
            fh.write(json.dumps({"doc": f"q{i}", "text": text}) + "\n")
    return d, model


def test_hf_task_build_info_verify_query(hf_files):
    d, model = hf_files
    idx = d / "idx"
    hf = ["--hf-model", model, "--data", d / "train.jsonl", "--id-field", "doc", "--max-length", 16]
    cli("build", *hf, "--index", idx, "--f", 2, "--rank", 2, "--sketch-rank", 8, "--device", "cpu", "--quiet")
    info = json.loads(cli("info", "--index", idx, "--json").stdout)
    assert info["rows"] == len(CORPUS) * 3 and info["c"] == 2
    assert any(l["name"].endswith("attn.c_attn") for l in info["layers"])
    assert "ok:" in cli("verify", "--index", idx, "--quiet").stdout
    out = d / "results.jsonl"
    # queries need no training data: the index has it
    cli("query", "--hf-model", model, "--id-field", "doc", "--max-length", 16, "--queries", d / "queries.jsonl", "--index", idx, "--top-k", 3, "--out", out,
        "--device", "cpu", "--quiet")
    results = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["id"] for r in results] == ["q0", "q1", "q2"]
    for r in results:
        assert len(r["proponents"]) == 3
        assert all(p["id"].startswith("d") for p in r["proponents"] + r["opponents"])
        # a query identical to training texts (three copies of it) finds them first
        q = int(r["id"][1:])
        assert {p["row"] % len(CORPUS) for p in r["proponents"]} == {q}


def test_cli_help_and_bad_inputs(hf_files, tmp_path):
    d, model = hf_files
    top = cli("--help").stdout
    for command in ("build", "append", "fit", "query", "info", "verify"):
        assert command in top
        assert "--index" in cli(command, "--help").stdout
    assert "--sketch-rank" in cli("build", "--help").stdout and "--damping-policy" in cli("build", "--help").stdout
    bad = cli("build", "--index", tmp_path / "i", check=False)
    assert bad.returncode != 0 and "no task" in bad.stderr
    bad = cli("build", "--hf-model", tmp_path / "nomodel", "--data", d / "train.jsonl", "--index", tmp_path / "i",
              check=False)
    assert bad.returncode == 1 and "nomodel" in bad.stderr and "Traceback" not in bad.stderr
    (tmp_path / "junk").mkdir()
    bad = cli("verify", "--index", tmp_path / "junk", check=False)
    assert bad.returncode == 1 and "not a lorif-stream index" in bad.stderr


def test_hf_dtype_bf16_builds_and_queries_and_a_mismatched_dtype_is_refused(hf_files):
    import numpy as np
    import torch

    from lorif_stream.hf_task import HFCausalLMTask
    from lorif_stream.task import TaskLoadError

    d, model = hf_files
    assert HFCausalLMTask(model, None, model_dtype="bf16").model().dtype == torch.bfloat16
    assert HFCausalLMTask(model, None).model().dtype == torch.float32  # the default keeps fp32
    with pytest.raises(TaskLoadError, match="'int8'"):
        HFCausalLMTask(model, None, model_dtype="int8")
    idx, out, scores = d / "idx-bf16", d / "r-bf16.jsonl", d / "s-bf16.npy"
    common = ["--hf-model", model, "--id-field", "doc", "--max-length", 16, "--hf-dtype", "bf16"]
    cli("build", *common, "--data", d / "train.jsonl", "--index", idx, "--device", "cpu", "--quiet")
    cli("query", *common, "--queries", d / "queries.jsonl", "--index", idx, "--out", out, "--scores", scores,
        "--device", "cpu", "--quiet")
    s = np.load(scores)
    assert np.isfinite(s).all() and s.std() > 0
    for r in (json.loads(l) for l in out.read_text().splitlines()):  # each query's own copies first
        assert {p["row"] % len(CORPUS) for p in r["proponents"][:3]} == {int(r["id"][1:])}
    # the same weights in fp32 give other gradients: the fingerprint refuses them, in one line
    bad = cli("query", *common[:-2], "--queries", d / "queries.jsonl", "--index", idx, "--out", d / "x.jsonl",
              "--device", "cpu", "--quiet", check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "model" in bad.stderr.lower()
