#!/usr/bin/env python
"""DGPO against its baselines on the embedded task: one shared (cached) warm start, several RL
seeds, one run of the main job per (loss, seed). Writes a markdown table and a plot of held-out
accuracy and entropy per step.

    python tools/compare_losses.py --losses dgpo grpo cispo gppo --seeds 0 1 --out outputs/compare [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_one(args, loss: str, seed: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           str(REPO / "examples" / "train_dgpo.py"), "--config", args.config, "--overwrite",
           f"loss.name={loss}", f"algo.seed={seed}", f"output_dir={out}", f"eval.every={args.eval_every}",
           *args.overrides]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "run.log").open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                            env=dict(os.environ, OMP_NUM_THREADS="1")).returncode
    if rc != 0:
        raise RuntimeError(f"{loss} seed {seed} failed (rc={rc}); see {out / 'run.log'}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"summary": json.loads((out / "summary.json").read_text()), "rows": rows}


def mean_std(xs):
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "examples" / "configs" / "embedded_cpu.yaml"))
    p.add_argument("--losses", nargs="+", default=["dgpo", "grpo", "cispo", "gppo"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--out", default="outputs/compare")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = p.parse_args(argv)
    root = Path(args.out)
    results = {loss: [run_one(args, loss, s, root / f"{loss}-seed{s}") for s in args.seeds] for loss in args.losses}

    lines = ["| loss | held-out acc. before | after (mean ± std over seeds) | final entropy | mean LN frac | mean HP frac |",
             "|---|---|---|---|---|---|"]
    for loss, runs in results.items():
        before = mean_std([r["summary"]["eval_before"]["accuracy"] for r in runs])
        after = mean_std([r["summary"]["eval_after"]["accuracy"] for r in runs])
        train = [[x for x in r["rows"] if x.get("kind") == "train" and "entropy" in x] for r in runs]
        ent = mean_std([t[-1]["entropy"] for t in train if t])
        ln = statistics.mean(x["ln_frac"] for t in train for x in t)
        hp = statistics.mean(x["hp_frac"] for t in train for x in t)
        lines.append(f"| {loss} | {before[0]:.3f} | {after[0]:.3f} ± {after[1]:.3f} | {ent[0]:.3f} | {ln:.4f} | {hp:.4f} |")
    table = "\n".join(lines)
    (root / "comparison.md").write_text(table + "\n")
    (root / "comparison.json").write_text(json.dumps(
        {loss: [r["summary"] for r in runs] for loss, runs in results.items()}, indent=2, default=float))
    plot(results, root / "comparison.png")
    print(table)
    print(f"\nwrote {root / 'comparison.md'}, {root / 'comparison.png'}")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4), constrained_layout=True)
    for loss, runs in results.items():
        evals = [[(x["step"], x["eval_accuracy"]) for x in r["rows"] if x.get("kind") == "eval"] for r in runs]
        steps = [s for s, _ in evals[0]]
        acc = [statistics.mean(e[i][1] for e in evals) for i in range(len(steps))]
        line, = a1.plot(steps, acc, marker="o", label=loss)
        train = [[x for x in r["rows"] if x.get("kind") == "train" and "entropy" in x] for r in runs]
        n = min(len(t) for t in train)
        a2.plot([train[0][i]["step"] for i in range(n)], [statistics.mean(t[i]["entropy"] for t in train) for i in range(n)],
                color=line.get_color(), label=loss)
    a1.set(title="held-out accuracy (mean over seeds)", xlabel="RL step")
    a2.set(title="policy entropy on rollout tokens", xlabel="RL step")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
