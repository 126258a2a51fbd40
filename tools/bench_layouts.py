#!/usr/bin/env python
"""Which process layout runs `make demo`'s job fastest on this machine: runs the main job with
each layout for a few RL steps, alternately (A B C A B C ...), and prints the median and p10 of
`step_s` (steps after --warmup) with the per-stage times and the machine's load average during
each run. All layouts compute the same thing (exact up to float rounding); only speed differs.

Layouts (2 cores):
  tp2   2 processes, 1 thread each, tensor parallel (the vocab-parallel path)
  dp2   2 processes, 1 thread each, data parallel (parallel.tensor_model_parallel_size=1)
  p1t2  1 process, 2 threads (parallel.tensor_model_parallel_size=1)
  p1t1  1 process, 1 thread (a reference: one core idle)

    python tools/bench_layouts.py --steps 20 --repeats 2            # ~5-10 min on 2 idle cores
    python tools/bench_layouts.py --layouts tp2,p1t2 -- algo.mini_batches=1
    python tools/bench_layouts.py --busy 1      # each run next to one busy-looping process (another job)

The first run pays the SFT warm start (cached under --work/cache, shared by all runs).
Other processes on the machine slow every run: the load column says how busy it was.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "tp2": (2, 1, ["parallel.tensor_model_parallel_size=2"]),
    "dp2": (2, 1, ["parallel.tensor_model_parallel_size=1"]),
    "p1t2": (1, 2, ["parallel.tensor_model_parallel_size=1"]),
    "p1t1": (1, 1, ["parallel.tensor_model_parallel_size=1"]),
}
STAGES = ("rollout_s", "reward_s", "old_logp_s", "update_s", "sync_s")


def run_one(name, args, extra, idx):
    procs, threads, over = LAYOUTS[name]
    out = Path(args.work) / f"{name}-{idx}"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(procs),
           "--master_port", str(29700 + idx), str(ROOT / "examples" / "train_dgpo.py"),
           "--config", args.config, "--overwrite", f"algo.steps={args.steps}", "eval.every=0",
           f"eval.num_prompts={args.eval_prompts}", "tensorboard=false", f"output_dir={out}",
           f"warmstart.cache_dir={Path(args.work) / 'cache'}", *over, *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    loads, done = [], threading.Event()

    def sample():
        while not done.wait(1.0):
            loads.append(os.getloadavg()[0])

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    t0 = time.time()
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    finally:
        for b in busy:
            b.kill()
            b.wait()
    done.set()
    th.join()
    if res.returncode != 0:
        sys.exit(f"{name} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if r["kind"] == "train" and r["step"] > args.warmup]
    evals = [r for r in rows if r["kind"] == "eval"]
    steps = sorted(r["step_s"] for r in train)
    return {"layout": name, "median": statistics.median(steps), "p10": steps[max(0, len(steps) // 10 - 1)] if len(steps) >= 10 else steps[0],
            **{s: statistics.median(r[s] for r in train) for s in STAGES},
            "acc": evals[-1]["eval_accuracy"] if evals else float("nan"),
            "load": statistics.mean(loads) if loads else os.getloadavg()[0], "wall": time.time() - t0}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "examples" / "configs" / "embedded_cpu.yaml"))
    p.add_argument("--layouts", default="tp2,dp2,p1t2")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the statistics")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--eval-prompts", type=int, default=50)
    p.add_argument("--work", default=str(ROOT / "outputs" / "bench_layouts"))
    p.add_argument("--busy", type=int, default=0, help="busy-looping processes running beside each run")
    p.add_argument("overrides", nargs="*", help="config overrides for every layout")
    args = p.parse_args()
    names = args.layouts.split(",")
    results, idx = [], 0
    for _ in range(args.repeats):
        for n in names:
            r = run_one(n, args, args.overrides, idx)
            idx += 1
            results.append(r)
            print(f"  {n}: median {r['median']:.3f} s/step, load {r['load']:.1f}", file=sys.stderr, flush=True)
    base = statistics.median(r["median"] for r in results if r["layout"] == names[0])
    print(f"\nsteps {args.warmup + 1}-{args.steps}, {os.cpu_count()} CPUs, {args.busy} busy process(es) beside each run; "
          f"x = median s/step of {names[0]} / this run's")
    print("| layout | run | s/step median | p10 | rollout | reward | old log-probs | update | sync | held-out acc | load avg | x |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(results):
        print(f"| {r['layout']} | {i + 1} | {r['median']:.3f} | {r['p10']:.3f} | " + " | ".join(
            f"{r[s]:.3f}" for s in STAGES) + f" | {r['acc']:.3f} | {r['load']:.1f} | {base / r['median']:.2f} |")


if __name__ == "__main__":
    main()
