"""tools/convert_hf_to_megatron.py and tools/convert_megatron_to_hf.py (one 2-process torchrun launch).

HF (sharded safetensors; Qwen2 tied, Llama, Qwen3) -> Megatron dist checkpoint at one TP/PP layout ->
loaded at another (TP2/PP1 <-> TP1/PP2; Qwen3 on uneven stages 1+3 -> 3+1) -> HF folder (fp32 and
bf16): bit-exact, loadable by transformers, tokenizer files kept, no temporary folders left; bad
inputs fail naming the folder. The command lines: each user error is one line on stderr from rank
0, exit code 2, before anything is built or written.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from torchrun_util import run_torchrun  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHECKS = ["qwen2_tied/hf_to_megatron_tp2pp1", "qwen2_tied/megatron_to_hf_tp1pp2_fp32",
          "qwen2_tied/megatron_to_hf_tp1pp2_bf16", "llama/hf_to_megatron_tp1pp2",
          "llama/megatron_to_hf_tp2pp1_fp32", "llama/megatron_to_hf_tp2pp1_bf16", "llama/bf16_params_round_trip",
          "llama/fp32_ckpt_loaded_as_bf16", "qwen3/uneven_pp2_both_ways", "bad_inputs"]


@pytest.fixture(scope="module")
def results():
    return run_torchrun("weight_sync_tools_worker.py", 2)


@pytest.mark.dist
@pytest.mark.parametrize("name", CHECKS)
def test_convert_tools(results, name):
    assert name in results, f"check {name} did not run"
    assert results[name]["ok"], results[name]["detail"]


def test_cli_rejects_non_checkpoint(tmp_path):
    bad = tmp_path / "notckpt"
    bad.mkdir()
    r = subprocess.run([sys.executable, str(REPO / "tools" / "convert_hf_to_megatron.py"), "--hf", str(bad),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert r.returncode != 0 and "no config.json" in r.stderr and str(bad) in r.stderr
    assert not (tmp_path / "o").exists()


def _cli(tool, args, tmp_path, **env):
    return subprocess.run([sys.executable, str(REPO / "tools" / tool), *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **env))


def _one_line(r, *fragments):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for f in fragments:
        assert f in r.stderr, (f, r.stderr)


@pytest.fixture(scope="module")
def hf_qwen3(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent / "workers"))
    from weight_sync_common import save_hf_model, tiny_config

    d = tmp_path_factory.mktemp("cli") / "hf_qwen3"
    save_hf_model(tiny_config("qwen3"), d)  # 4 layers, 8 heads, 2 KV heads
    return d


def test_cli_hf_to_megatron_user_errors(hf_qwen3, tmp_path):
    import json

    tool, out = "convert_hf_to_megatron.py", tmp_path / "o"
    _one_line(_cli(tool, ["--hf", tmp_path / "nope", "--out", out], tmp_path), "nope", "not a directory")
    _one_line(_cli(tool, ["--hf", hf_qwen3, "--out", out, "--tp", 3], tmp_path),
              "--tp=3 must divide model.num_attention_heads=8", "config.json")
    _one_line(_cli(tool, ["--hf", hf_qwen3, "--out", out, "--pp", 3], tmp_path),
              "--pp=3 must divide model.num_layers=4", "--decoder-first-pipeline-num-layers")
    _one_line(_cli(tool, ["--hf", hf_qwen3, "--out", out, "--tp", 2], tmp_path),  # 1 process for TP 2
              "does not divide the 1 processes")
    r = _cli(tool, ["--hf", hf_qwen3, "--out", out, "--tp", 2], tmp_path, RANK="1", WORLD_SIZE="3")
    assert r.returncode == 2 and r.stderr == "", r.stderr  # other ranks: silent
    bad = tmp_path / "mistral"
    bad.mkdir()
    (bad / "model.safetensors").symlink_to(hf_qwen3 / "model.safetensors")
    (bad / "config.json").write_text(json.dumps(dict(json.loads((hf_qwen3 / "config.json").read_text()),
                                                     model_type="mistral")))
    _one_line(_cli(tool, ["--hf", bad, "--out", out], tmp_path), "model_type='mistral' is not supported")
    held = tmp_path / "held"
    (held / "step_00000000").mkdir(parents=True)
    _one_line(_cli(tool, ["--hf", hf_qwen3, "--out", held], tmp_path), "already holds a checkpoint")
    assert not out.exists()


def test_cli_megatron_to_hf_user_errors(hf_qwen3, tmp_path):
    import json

    from megatron_dgpo.weight_sync import HFCheckpoint

    step = tmp_path / "ck" / "step_00000000"
    step.mkdir(parents=True)
    with HFCheckpoint(hf_qwen3) as ck:
        mc = ck.model_config().to_dict()
    (step / "dgpo_meta.json").write_text(json.dumps({"model_config": mc, "step": 0}))
    tool, out = "convert_megatron_to_hf.py", tmp_path / "o"
    _one_line(_cli(tool, ["--ckpt", tmp_path, "--out", out], tmp_path), "not a megatron_dgpo checkpoint")
    _one_line(_cli(tool, ["--ckpt", step, "--out", out, "--pp", 2, "--decoder-first-pipeline-num-layers", 4],
                   tmp_path, WORLD_SIZE="2"), "leaves 0 layers for 1 other stage", "dgpo_meta.json")
    _one_line(_cli(tool, ["--ckpt", step, "--out", out, "--hf-files", tmp_path], tmp_path), "--hf-files", "config.json")
    out.mkdir()
    _one_line(_cli(tool, ["--ckpt", step, "--out", out], tmp_path), "exists; pass --overwrite")
