"""tools/evaluate.py end to end on a tiny random Qwen2 (save_pretrained) with the character
tokenizer and small JSONL / parquet math sets, scored by the math-verify reward pool."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "evaluate.py"


def _tool():
    s = importlib.util.spec_from_file_location("dgpo_evaluate_tool", TOOL)
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 1-layer Qwen2 over the characters "0" and "1" (8 tokens with the specials), so random
    sampling answers single-digit problems correctly often enough to give non-trivial metrics."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from megatron_dgpo.data import build_char_tokenizer

    d = tmp_path_factory.mktemp("tiny_qwen2")
    tok = build_char_tokenizer(chars="01", save_dir=d)
    cfg = transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(d)
    rows = [{"prompt": "1" * (i + 1), "reward_model": {"ground_truth": str(i % 2)}} for i in range(6)]
    (d / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    verl = [{"prompt": [{"role": "user", "content": "0" * (i + 1)}], "reward_model": {"ground_truth": str(i % 2)}}
            for i in range(4)]
    pq.write_table(pa.Table.from_pylist(verl), d / "verl.parquet")
    return d


def test_evaluate_end_to_end(tiny_model, tmp_path):
    out = tmp_path / "results.json"
    n, ks = 8, [1, 4, 8]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(data: str, extra: list[str], result: Path):
        cmd = [sys.executable, str(TOOL), "--model", str(tiny_model), "--data", data,
               "--n", str(n), *sum((["--k", str(k)] for k in ks), []), "--temperature", "1.0", "--top-p", "1.0",
               "--max-new-tokens", "1", "--prompt-suffix", "", "--reward", "math", "--reward-workers", "1",
               "--out", str(result), *extra]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return res

    # two benchmarks in one call: a JSONL set (string prompts) and a parquet set (chat messages)
    res = run(f"toy={tiny_model / 'toy.jsonl'}", ["--data", f"verl={tiny_model / 'verl.parquet'}"], out)

    r = json.loads(out.read_text())
    assert set(r["metrics"]) == {"toy", "verl"} and r["ks"] == ks and r["sampling"]["n"] == n
    assert r["metrics"]["toy"]["num_problems"] == 6 and r["metrics"]["verl"]["num_problems"] == 4
    for name in ("toy", "verl"):
        m, raw = r["metrics"][name], r["per_problem"][name]
        assert m["num_problems"] == len(raw) > 0
        assert all(len(p) == n for p in raw)  # n samples per problem
        assert set(m) == {f"avg@{n}", "pass@1", "pass@4", "pass@8", "num_problems"}
        for key in (f"avg@{n}", "pass@1", "pass@4", "pass@8"):
            assert 0.0 <= m[key] <= 1.0
        assert math.isclose(m["pass@1"], m[f"avg@{n}"], abs_tol=1e-12)  # unbiased pass@1 == mean
        assert m[f"avg@{n}"] <= m["pass@4"] <= m["pass@8"]
        # pass@n is the fraction of problems with at least one correct sample
        assert math.isclose(m["pass@8"], sum(any(x > 0.5 for x in p) for p in raw) / len(raw))
        assert math.isclose(m[f"avg@{n}"], sum(map(sum, raw)) / (n * len(raw)))
        assert f"| {name} |" in r["table"]
    toy = r["metrics"]["toy"]
    assert 0.0 < toy["avg@8"] < toy["pass@8"], toy  # the 2-character model is sometimes right
    header = "| benchmark | problems | avg@8 | pass@1 | pass@4 | pass@8 |"
    assert header in res.stdout and "| toy | 6 |" in res.stdout and "| verl | 4 |" in res.stdout
    assert "| average | - |" in res.stdout


def test_megatron_checkpoint_detection_and_conversion_command(tmp_path, monkeypatch):
    tool = _tool()
    step = tmp_path / "ckpt" / "step_00000003"
    step.mkdir(parents=True)
    (step / "dgpo_meta.json").write_text("{}")
    (tmp_path / "ckpt" / "latest").write_text("step_00000003")
    assert tool.is_megatron_checkpoint(step) and tool.is_megatron_checkpoint(tmp_path / "ckpt")
    assert not tool.is_megatron_checkpoint(tmp_path)

    seen = {}

    def fake_run(cmd, env=None):
        seen["cmd"] = cmd
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(tool.subprocess, "run", fake_run)
    hf = tool.convert_checkpoint(tmp_path / "ckpt", tmp_path / "hf", hf_files="/tok", tp=2)
    assert hf == tmp_path / "hf"
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc_per_node=2" in cmd
    assert cmd[5].endswith("tools/convert_megatron_to_hf.py")
    assert cmd[cmd.index("--ckpt") + 1] == str(tmp_path / "ckpt") and cmd[cmd.index("--tp") + 1] == "2"
    assert cmd[cmd.index("--hf-files") + 1] == "/tok"

    with pytest.raises(SystemExit, match="NAME=PATH"):
        tool.parse_data(["nopath"])
    with pytest.raises(SystemExit, match="no such file"):
        tool.parse_data([f"x={tmp_path / 'missing.jsonl'}"])
