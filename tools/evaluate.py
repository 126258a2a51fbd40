#!/usr/bin/env python
"""avg@n and unbiased pass@k of a checkpoint on math benchmarks (paper-style table + JSON).

    python tools/evaluate.py --model HF_DIR_OR_MEGATRON_CKPT \\
        --data aime24=/data/aime24.parquet --data math500=/data/math500.jsonl \\
        --n 16 --k 1 --k 16 --temperature 0.6 --top-p 0.95 --max-new-tokens 32768 \\
        [--sglang-url http://host:30000 ...] [--out results.json]

--model: a Hugging Face folder (config.json + safetensors), or a megatron_dgpo checkpoint (a root
with `latest` or a step directory with dgpo_meta.json), which is first converted to HF with
tools/convert_megatron_to_hf.py (torchrun, in a subprocess) into --hf-out (default: a temp dir).
Generation runs on the embedded `transformers` engine (CPU or --device cuda), or on running
SGLang servers with --sglang-url (started on --model; this tool then only reads the tokenizer).

Data: each --data NAME=PATH is a parquet/JSONL file read like training data
(megatron_dgpo.data.PromptDataConfig: --prompt-key, --answer-key, chat template, --prompt-suffix).
Scoring: the training reward checker (--reward math: math-verify in killable worker processes;
exact: string match); a sample is correct when its reward > 0.5.
Metrics per benchmark (percent in the table, fractions in the JSON): avg@n (mean correctness of
all n samples of every problem) and pass@k = 1 - C(n-c, k) / C(n, k) for every --k <= n.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."


def is_megatron_checkpoint(path: Path) -> bool:
    return (path / "dgpo_meta.json").is_file() or (path / "latest").is_file()


def convert_checkpoint(ckpt: Path, out: Path, hf_files: str | None = None, tp: int = 1,
                       dtype: str | None = None) -> Path:
    """Megatron checkpoint -> HF folder via tools/convert_megatron_to_hf.py under torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}",
           str(REPO / "tools" / "convert_megatron_to_hf.py"), "--ckpt", str(ckpt), "--out", str(out),
           "--tp", str(tp), "--overwrite"]
    if hf_files:
        cmd += ["--hf-files", hf_files]
    if dtype:
        cmd += ["--dtype", dtype]
    print("converting:", " ".join(cmd), flush=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0 or not (out / "config.json").is_file():
        raise SystemExit(f"checkpoint conversion failed (exit {proc.returncode}): {ckpt}")
    return out


def parse_data(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--data {item!r}: expected NAME=PATH")
        if name in out:
            raise SystemExit(f"--data: benchmark {name!r} given twice")
        if not Path(path).is_file():
            raise SystemExit(f"--data {name}: no such file {path}")
        out[name] = path
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF folder or megatron_dgpo checkpoint (root or step dir)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    p.add_argument("--data", action="append", required=True, metavar="NAME=PATH", help="benchmark file (repeat)")
    p.add_argument("--prompt-key", default="prompt")
    p.add_argument("--answer-key", default="reward_model.ground_truth")
    p.add_argument("--answer-regex", default=None)
    p.add_argument("--prompt-suffix", default=DEFAULT_SUFFIX)
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--no-chat-template", action="store_true")
    p.add_argument("--max-prompt-length", type=int, default=2048)
    p.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    p.add_argument("--n", type=int, default=16, help="samples per problem (the n of avg@n)")
    p.add_argument("--k", type=int, action="append", default=None, help="pass@k (repeat; default 1 and n)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--max-new-tokens", type=int, default=32768)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reward", choices=["math", "exact"], default="math")
    p.add_argument("--reward-workers", type=int, default=4)
    p.add_argument("--reward-timeout", type=float, default=5.0)
    p.add_argument("--sglang-url", action="append", default=[], help="generate on these SGLang servers")
    p.add_argument("--device", default="cpu", help="embedded engine device (cpu, cuda)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generate call")
    p.add_argument("--hf-out", help="where a converted Megatron checkpoint goes (default: temp dir)")
    p.add_argument("--convert-tp", type=int, default=1)
    p.add_argument("--out", help="JSON results file")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from megatron_dgpo.data import PromptDataConfig, load_prompt_dataset, load_tokenizer
    from megatron_dgpo.eval import evaluate
    from megatron_dgpo.reward import RewardConfig, make_reward_fn
    from megatron_dgpo.rollout import SamplingParams

    data = parse_data(args.data)
    ks = sorted(set(args.k or [1, args.n]))
    if any(k < 1 or k > args.n for k in ks):
        raise SystemExit(f"--k values must be in [1, --n={args.n}], got {ks}")

    model_path = Path(args.model)
    tmp = None
    source = {"model": str(model_path)}
    if is_megatron_checkpoint(model_path):
        if args.hf_out:
            hf_dir = Path(args.hf_out)
        else:
            tmp = tempfile.TemporaryDirectory(prefix="dgpo_eval_hf_")
            hf_dir = Path(tmp.name) / "hf"
        model_path = convert_checkpoint(model_path, hf_dir, hf_files=args.tokenizer, tp=args.convert_tp)
        source["converted_to"] = str(model_path)
    elif not (model_path / "config.json").is_file() and not args.sglang_url:
        raise SystemExit(f"--model {model_path}: neither a HF folder (config.json) nor a megatron_dgpo checkpoint")

    tok_dir = args.tokenizer or str(model_path)
    tok = load_tokenizer(tok_dir)
    datasets = {}
    for name, path in data.items():
        cfg = PromptDataConfig(path=path, prompt_key=args.prompt_key, answer_key=args.answer_key,
                               answer_regex=args.answer_regex, apply_chat_template=not args.no_chat_template,
                               system_prompt=args.system_prompt, prompt_suffix=args.prompt_suffix,
                               max_prompt_length=args.max_prompt_length, limit=args.limit)
        ds = load_prompt_dataset(cfg, tok)
        if len(ds) == 0:
            raise SystemExit(f"--data {name}: no usable problems in {path} ({ds.stats})")
        datasets[name] = ds
        print(f"{name}: {len(ds)} problems ({ds.stats})", flush=True)

    if args.sglang_url:
        from megatron_dgpo.rollout.sglang_engine import SGLangServerEngine

        # servers launched by our jobs require the job's key (the launcher exports it)
        engine = SGLangServerEngine(args.sglang_url, api_key=os.environ.get("DGPO_SGLANG_API_KEY") or None)
        backend = {"engine": "sglang", "urls": args.sglang_url}
    else:
        from transformers import AutoModelForCausalLM

        from megatron_dgpo.rollout import HFRolloutEngine

        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=getattr(torch, args.dtype))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        engine = HFRolloutEngine(model, eos_token_ids=tok.eos_token_id, pad_token_id=pad, device=args.device,
                                 max_batch_size=max(1, args.batch_size * args.n), seed=args.seed)
        backend = {"engine": "embedded", "device": args.device, "dtype": args.dtype}

    sampling = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              max_new_tokens=args.max_new_tokens, seed=args.seed)
    reward_fn = make_reward_fn(RewardConfig(kind=args.reward, num_workers=args.reward_workers,
                                            timeout_s=args.reward_timeout))
    t0 = time.time()
    try:
        metrics, table, raw = evaluate(engine, datasets, reward_fn,
                                       lambda ids: tok.decode(ids, skip_special_tokens=True),
                                       sampling, ks=ks, prompts_per_call=args.batch_size)
    finally:
        close = getattr(reward_fn, "close", None)
        if close:
            close()
        engine.close()
    elapsed = time.time() - t0

    print(f"\n== {source['model']}: n={args.n} samples per problem, T={args.temperature}, "
          f"top_p={args.top_p}, max_new_tokens={args.max_new_tokens} ==")
    print(table, flush=True)
    if args.out:
        result = {
            **source, "tokenizer": tok_dir, "backend": backend, "reward": args.reward,
            "sampling": {"n": args.n, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                         "max_new_tokens": args.max_new_tokens, "seed": args.seed},
            "ks": ks, "data": data, "metrics": metrics, "table": table, "elapsed_s": elapsed,
            # per benchmark, per problem: the reward of each of the n samples
            "per_problem": raw,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
