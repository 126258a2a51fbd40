#!/usr/bin/env python
"""DGPO against its baselines (and DGPO's n/m ablations) on the embedded task: one shared
(cached) warm start, several RL seeds, one run of the main job per (method, seed), one at a time.
Writes a markdown table (mean ± std over seeds), a JSON of every run's summary and one figure per
diagnostic (mean over seeds, shaded min..max).

    python tools/compare_losses.py --config examples/configs/embedded_offpolicy.yaml \\
        --seeds 0 1 2 3 4 --out outputs/compare_offpolicy --figures docs/offpolicy [key=value ...]

Methods: a preset name (METHODS) or `label:key=value,key=value` (overrides for that method only).
Every method gets the same config; the presets differ only in loss.name (and DGPO's n, m).
A run that aborts (non-finite weights, too many skipped updates, collapse) is kept: it counts as a
divergence event and its metrics up to the abort are used.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

METHODS = {
    "dgpo": ["loss.name=dgpo", "loss.dgpo_n=1", "loss.dgpo_m=2"],
    "grpo": ["loss.name=grpo"],
    "cispo": ["loss.name=cispo"],
    "gppo": ["loss.name=gppo"],
    "ce_gppo": ["loss.name=ce_gppo"],
    "dgpo_n2_m2": ["loss.name=dgpo", "loss.dgpo_n=2", "loss.dgpo_m=2"],
    "dgpo_n1_m4": ["loss.name=dgpo", "loss.dgpo_n=1", "loss.dgpo_m=4"],
    "dgpo_n2_m4": ["loss.name=dgpo", "loss.dgpo_n=2", "loss.dgpo_m=4"],
}
DEFAULT_METHODS = list(METHODS)

# Per-step diagnostics plotted (metrics.jsonl keys of train rows, loss/diagnostics.py); a tuple is
# one figure with one panel per key. log: log-scale y.
FIGURES = [
    ("heldout_accuracy", ("eval_accuracy",), False),
    ("entropy", ("entropy",), False),
    ("trust_region_fraction", ("ln_frac", "hp_frac"), False),
    ("wp_p99", ("wp_ln_p99", "wp_hp_p99"), True),
    ("wp_max", ("wp_ln_max", "wp_hp_max"), True),
    ("grad_share", ("grad_share_ln", "grad_share_hp"), False),
    ("ln_low_pi_old_fraction", ("ln_lowp_frac",), False),
    ("grad_norm_max", ("grad_norm_max",), True),
]
SPIKE_FACTOR = 5.0  # a grad-norm spike: a step whose max grad norm exceeds 5x the run's median
SMOOTH = 5  # train-row curves: rolling mean over this many steps (per seed, NaN-aware)


def parse_method(spec: str):
    if spec in METHODS:
        return spec, METHODS[spec]
    if ":" in spec:
        label, rest = spec.split(":", 1)
        return label, [kv for kv in rest.split(",") if kv]
    return spec, [f"loss.name={spec}"]


def run_one(args, label: str, method_overrides, seed: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           str(REPO / "examples" / "train_dgpo.py"), "--config", args.config, "--overwrite",
           *args.overrides, *method_overrides, f"algo.seed={seed}", f"output_dir={out}"]
    out.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        t0 = time.perf_counter()
        with (out / "run.log").open("w") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                                env=dict(os.environ, OMP_NUM_THREADS="1")).returncode
        wall = time.perf_counter() - t0
        # A launcher stopped from outside (SIGTERM to torchrun) is no outcome of the method: rerun.
        if rc == 0 or "Received 15 death signal" not in (out / "run.log").read_text(errors="replace"):
            break
        print(f"{label} seed {seed}: launcher received SIGTERM, rerunning", flush=True)
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    summary = json.loads((out / "summary.json").read_text()) if rc == 0 and (out / "summary.json").exists() else None
    print(f"{label} seed {seed}: rc={rc} {wall:.0f} s", flush=True)
    return {"label": label, "seed": seed, "rc": rc, "wall_s": wall, "summary": summary, "rows": rows}


def train_rows(run):
    return [r for r in run["rows"] if r.get("kind") == "train"]


def eval_rows(run):
    return [r for r in run["rows"] if r.get("kind") == "eval"]


def _finite(xs):
    return [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]


def run_stats(run, group_size: int) -> dict:
    """Scalars of one run: final held-out accuracy and pass@k, final entropy, max grad norm, spikes,
    divergence events (non-finite updates + aborted run + accuracy collapse), mean LN / HP."""
    tr, ev = train_rows(run), eval_rows(run)
    first, last = (ev[0] if ev else {}), (ev[-1] if ev else {})
    gmax = _finite(r.get("grad_norm_max", float("nan")) for r in tr)
    med = statistics.median(gmax) if gmax else float("nan")
    nonfinite = sum(_finite(r.get("nonfinite_updates", 0.0) for r in tr))
    # Collapse: held-out accuracy ends below half of its value before RL, or the rollout accuracy
    # (5-step mean) falls below half of its first 5 steps' mean.
    acc = [r.get("accuracy", float("nan")) for r in tr]
    roll = [statistics.mean(_finite(acc[max(0, i - 4):i + 1]) or [float("nan")]) for i in range(len(acc))]
    collapsed = bool(ev and last.get("eval_accuracy", 1) < 0.5 * first.get("eval_accuracy", 0))
    if len(roll) > 5 and math.isfinite(roll[4]):
        collapsed |= any(x < 0.5 * roll[4] for x in roll[5:] if math.isfinite(x))
    aborted = run["rc"] != 0
    return {
        "acc_before": first.get("eval_accuracy", float("nan")),
        "acc_final": last.get("eval_accuracy", float("nan")) if not aborted else float("nan"),
        "pass_k": last.get(f"eval_pass@{group_size}", float("nan")) if not aborted else float("nan"),
        "entropy_final": tr[-1]["entropy"] if tr else float("nan"),
        "grad_norm_max": max(gmax) if gmax else float("nan"),
        "spikes": sum(g > SPIKE_FACTOR * med for g in gmax),
        "nonfinite": nonfinite, "aborted": int(aborted), "collapsed": int(collapsed),
        "divergence": nonfinite + int(aborted) + int(collapsed),
        "ln": statistics.mean(_finite(r.get("ln_frac") for r in tr) or [float("nan")]),
        "hp": statistics.mean(_finite(r.get("hp_frac") for r in tr) or [float("nan")]),
        "grad_share_ln": statistics.mean(_finite(r.get("grad_share_ln") for r in tr) or [float("nan")]),
        "wall_s": run["wall_s"],
    }


def mean_std(xs):
    xs = _finite(xs)
    if not xs:
        return float("nan"), float("nan")
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def table(results, group_size: int) -> str:
    k = group_size
    lines = [f"| method | seeds | held-out acc. before | final held-out acc. | pass@{k} | final entropy | "
             "max grad norm | grad-norm spikes | divergence events | LN frac | HP frac | LN share of grad mass |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, runs in results.items():
        s = [run_stats(r, group_size) for r in runs]

        def ms(key, fmt=".3f"):
            m, d = mean_std(x[key] for x in s)
            return f"{m:{fmt}} ± {d:{fmt}}"

        div = sum(x["divergence"] for x in s)
        div_runs = sum(x["divergence"] > 0 for x in s)
        lines.append(f"| {label} | {len(s)} | {ms('acc_before')} | {ms('acc_final')} | {ms('pass_k')} | "
                     f"{ms('entropy_final')} | {ms('grad_norm_max', '.2f')} | {sum(x['spikes'] for x in s)} | "
                     f"{div} ({div_runs} runs) | {ms('ln', '.4f')} | {ms('hp', '.4f')} | {ms('grad_share_ln')} |")
    return "\n".join(lines)


def _rolling(xs, w):
    out = []
    for i in range(len(xs)):
        win = _finite(xs[max(0, i - w + 1):i + 1])
        out.append(statistics.mean(win) if win else float("nan"))
    return out


def curves(runs, key):
    """(steps, [per-seed series]) of one key: eval rows for eval_*, train rows (smoothed) otherwise."""
    if key.startswith("eval_"):
        series = [{r["step"]: r.get(key, float("nan")) for r in eval_rows(run)} for run in runs]
    else:
        series = []
        for run in runs:
            tr = train_rows(run)
            vals = _rolling([r.get(key, float("nan")) for r in tr], SMOOTH)
            series.append({r["step"]: v for r, v in zip(tr, vals)})
    steps = sorted(set().union(*[set(s) for s in series])) if series else []
    return steps, [[s.get(t, float("nan")) for t in steps] for s in series]


def plot(results, out_dir: Path, dpi: int = 60) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, keys, log in FIGURES:
        fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.4), constrained_layout=True, squeeze=False)
        for ax, key in zip(axes[0], keys):
            for i, (label, runs) in enumerate(results.items()):
                steps, per_seed = curves(runs, key)
                if not steps:
                    continue
                cols = list(zip(*per_seed))
                mean = [statistics.mean(_finite(c)) if _finite(c) else float("nan") for c in cols]
                lo = [min(_finite(c)) if _finite(c) else float("nan") for c in cols]
                hi = [max(_finite(c)) if _finite(c) else float("nan") for c in cols]
                style = "--" if label.startswith("dgpo_") else "-"
                line, = ax.plot(steps, mean, style, lw=1.3, label=label, color=f"C{i}")
                ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.12, lw=0)
            if log:
                ax.set_yscale("log")
            ax.set_title(key + ("" if key.startswith("eval_") else f" ({SMOOTH}-step mean)"), fontsize=9)
            ax.set_xlabel("RL step")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, ncol=2)
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        _to_palette(path)
        paths.append(path)
    return paths


def _to_palette(path: Path) -> None:
    """128-colour PNG: a third of the size of matplotlib's RGBA, small enough to commit under docs/."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=128)
    small.save(path, optimize=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "examples" / "configs" / "embedded_offpolicy.yaml"))
    p.add_argument("--methods", "--losses", nargs="+", default=DEFAULT_METHODS,
                   help=f"presets {sorted(METHODS)} or label:key=value,...")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default="outputs/compare")
    p.add_argument("--figures", default=None, help="folder for the PNGs (default: --out)")
    p.add_argument("--replot", action="store_true", help="only re-read the runs in --out and rewrite table and figures")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))  # run as `python tools/compare_losses.py` from a checkout
    from megatron_dgpo.config import TrainConfig
    from megatron_dgpo.configio import load_config

    group_size = load_config(TrainConfig, args.config, args.overrides).rollout.group_size
    root = Path(args.out)
    methods = [parse_method(m) for m in args.methods]
    results = {}
    # Seed-major order: a partial comparison (stopped early) has every method on its first seeds.
    for seed in args.seeds:
        for label, ov in methods:
            out = root / f"{label}-seed{seed}"
            if args.replot:
                if (out / "metrics.jsonl").exists():
                    done = (out / "summary.json").exists()
                    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
                    run = {"label": label, "seed": seed, "rc": 0 if done else 1, "wall_s": float("nan"),
                           "summary": json.loads((out / "summary.json").read_text()) if done else None, "rows": rows}
                    results.setdefault(label, []).append(run)
                continue
            results.setdefault(label, []).append(run_one(args, label, ov, seed, out))
    text = table(results, group_size)
    (root / "comparison.md").write_text(text + "\n")
    (root / "comparison.json").write_text(json.dumps(
        {label: [dict(seed=r["seed"], rc=r["rc"], summary=r["summary"], stats=run_stats(r, group_size)) for r in runs]
         for label, runs in results.items()}, indent=2, default=float))
    figs = plot(results, Path(args.figures) if args.figures else root)
    print(text)
    print(f"\nwrote {root / 'comparison.md'}, {root / 'comparison.json'}, " + ", ".join(str(f) for f in figs))


if __name__ == "__main__":
    main()
