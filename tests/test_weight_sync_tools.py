"""tools/convert_hf_to_megatron.py and tools/convert_megatron_to_hf.py (one 2-process torchrun launch).

HF (sharded safetensors; Qwen2 tied, Llama) -> Megatron dist checkpoint at one TP/PP layout ->
loaded at another (TP2/PP1 <-> TP1/PP2) -> HF folder (fp32 and bf16): bit-exact, loadable by
transformers, tokenizer files kept, no temporary folders left; bad inputs fail naming the folder.
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
          "llama/megatron_to_hf_tp2pp1_fp32", "llama/megatron_to_hf_tp2pp1_bf16", "llama/bf16_params_round_trip", "bad_inputs"]


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
