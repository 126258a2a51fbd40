#!/usr/bin/env python
"""Side-by-side: `make demo`'s RL job vs TRL's GRPOTrainer doing the same work on this machine.

    python benchmarks/vs_trl/bench.py --work outputs/vs_trl                # P,T,P,T, 100 RL steps
    python benchmarks/vs_trl/bench.py --work W --plan P,T,P,T,P,T --steps 100 --project-layout tp2
    python benchmarks/vs_trl/bench.py --work W --plan P,T1,T,P     # T1: TRL on 1 thread (a reference)

TRL (1.16) goes into its own virtualenv (--trl-venv, built on first use): a venv that sees the
project's packages (torch, transformers) through a .pth file and gets trl, accelerate and datasets
installed into itself only; it is never a dependency of the project.

Both get the same work (see trl_grpo.py): the project's cached warm start (the first project run
makes it), char tokenizer, prompts in its sampler's order, ExactMatchReward, 32 prompts x 8
samples, 5 new tokens, temperature 1, fp32, Adam lr 5e-5, clip 1.0, 4 optimizer steps of 64
sequences per RL step. Runs alternate (P T P T ...), so machine noise hits both.

Per run: median and p10 s/RL step over steps --warmup+1..N (the step's own wall time: rollout,
reward, old log-probs, update, weight sync; evaluations excluded), generated tokens/s (median over
those steps of the step's generated tokens / its wall time), peak PSS of the process tree (shared pages
split between processes) in the loop (while RL steps --warmup+1..N-1 ran) and over the whole run,
held-out greedy accuracy after training through the project's own evaluation code, the mean
1-minute load average during the run (2 cores: load above 2 means others took CPU), and the ratio
x = median of TRL's fastest run / this run's median (> 1: faster than TRL; TRL's best run, since
other jobs on the machine only ever slow a run down).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CONFIG = ROOT / "examples" / "configs" / "embedded_cpu.yaml"
TRL_PINS = ["trl==1.16.0"]
# process count, threads per process, overrides: `make demo`'s layout first
LAYOUTS = {"demo": (2, 1, []), "tp2": (2, 1, ["parallel.tensor_model_parallel_size=2"]),
           "dp2": (2, 1, ["parallel.tensor_model_parallel_size=1"]),
           "p1t2": (1, 2, ["parallel.tensor_model_parallel_size=1"])}


def ensure_trl_venv(path: Path) -> Path:
    py = path / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import trl"], capture_output=True).returncode == 0:
        return py
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "zz_project_packages.pth").write_text(ours + "\n")  # torch, transformers: the same builds
    subprocess.run([str(py), "-m", "pip", "install", "-q", *TRL_PINS], check=True)
    return py


def export_data(work: Path, steps: int) -> Path:
    """The project's prompts in the order its sampler yields them, and the run's settings."""
    out = work / "data"
    if (out / "meta.json").exists():
        return out
    from megatron_dgpo.config import TrainConfig
    from megatron_dgpo.configio import load_config
    from megatron_dgpo.data import build_char_tokenizer
    from megatron_dgpo.rl.setup import load_data

    cfg = load_config(TrainConfig, str(CONFIG), [f"algo.steps={steps}"])
    train, _, sampler = load_data(cfg, build_char_tokenizer(), log=lambda *x: None)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train_steps.jsonl", "w") as f:
        for _ in range(steps):
            for e in sampler.next_batch():
                f.write(json.dumps({"prompt": e.prompt_text, "prompt_ids": e.prompt_ids, "answer": e.ground_truth}) + "\n")
    a, ro, loss = cfg.algo, cfg.rollout, cfg.loss
    meta = {"steps": steps, "prompts_per_step": a.prompts_per_step, "group_size": ro.group_size,
            "max_new_tokens": ro.max_new_tokens, "temperature": ro.temperature, "lr": cfg.optim.lr,
            "mini_batches": a.mini_batches, "clip_grad": cfg.optim.clip_grad, "eps_low": loss.eps_low,
            "eps_high": loss.eps_high, "seed": cfg.seed}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return out


def evaluate_hf(folder: str) -> float:
    """Held-out greedy accuracy of an HF folder through the project's evaluation path."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_dgpo.config import TrainConfig
    from megatron_dgpo.configio import load_config
    from megatron_dgpo.data import build_char_tokenizer
    from megatron_dgpo.reward import ExactMatchReward
    from megatron_dgpo.rl.evaluate import evaluate
    from megatron_dgpo.rl.setup import load_data
    from megatron_dgpo.rollout import HFRolloutEngine

    cfg = load_config(TrainConfig, str(CONFIG))
    tok = build_char_tokenizer()
    _, held_out, _ = load_data(cfg, tok, log=lambda *x: None)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    engine = HFRolloutEngine(model, eos_token_ids=tok.eos_token_id, pad_token_id=tok.pad_token_id or 0,
                             device="cpu", seed=cfg.seed)
    return float(evaluate(engine, ExactMatchReward(), tok, held_out.examples, cfg, distributed=False,
                          seed=cfg.seed)["accuracy"])


class Monitor(threading.Thread):
    """Peak PSS of a process tree and the machine's 1-minute load, sampled every 0.25 s; with
    `progress` (RL steps done so far), also the peak while RL steps warmup+1..steps-1 ran: the
    loop, without start-up, the final evaluation and the final checkpoint (whose writer
    processes, megatron-core's, add ~0.2 GB each at the very end)."""

    def __init__(self, pid: int, progress=None, window=(0, 0)):
        import psutil

        super().__init__(daemon=True)
        self.root, self.psutil = psutil.Process(pid), psutil
        self.peak_pss, self.loads, self.stop = 0, [], False
        self.progress, self.window, self.loop_pss = progress, window, 0

    def run(self):
        while not self.stop:
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except self.psutil.NoSuchProcess:
                break
            pss = 0
            for p in procs:
                try:
                    pss += p.memory_full_info().pss
                except self.psutil.Error:
                    pass
            self.peak_pss = max(self.peak_pss, pss)
            if self.progress is not None and self.window[0] <= self.progress() < self.window[1]:
                self.loop_pss = max(self.loop_pss, pss)
            self.loads.append(os.getloadavg()[0])
            time.sleep(0.25)


def _count(path: Path, text: str = "", div: int = 1) -> int:
    """Lines of `path` containing `text` (a file holding one integer: that integer), // div."""
    try:
        body = path.read_text()
    except OSError:
        return 0
    n = sum(text in x for x in body.splitlines()) if text else int(body.strip() or 0)
    return n // div


def run(cmd, env, log: Path, progress=None, window=(0, 0)):
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        mon = Monitor(proc.pid, progress, window)
        mon.start()
        rc = proc.wait()
        mon.stop = True
        mon.join()
    if rc:
        sys.exit(f"{cmd[:4]}... failed (exit {rc}); see {log}")
    return mon


def project_run(a, idx: int) -> dict:
    nproc, threads, over = LAYOUTS[a.project_layout]
    out = Path(a.work) / "runs" / f"{idx:02d}_P"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(29800 + idx),
           str(ROOT / "examples" / "train_dgpo.py"), "--config", str(CONFIG), "--overwrite",
           f"algo.steps={a.steps}", f"output_dir={out}", f"warmstart.cache_dir={Path(a.work) / 'cache'}",
           "tensorboard=false", *over]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    out.mkdir(parents=True, exist_ok=True)
    mon = run(cmd, env, out.parent / f"{idx:02d}_P.log",
              progress=lambda: _count(out / "metrics.jsonl", '"kind": "train"'), window=(a.warmup, a.steps))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if r["kind"] == "train" and r["step"] > a.warmup]
    walls = [r["step_s"] for r in train]
    meta = json.loads((Path(a.work) / "data" / "meta.json").read_text())
    gen = [r["response_len"] * meta["prompts_per_step"] * meta["group_size"] for r in train]  # generated tokens
    acc = json.loads((out / "summary.json").read_text())["eval_after"]["accuracy"]
    split = {k: statistics.median(r[k] for r in train) for k in ("rollout_s", "old_logp_s", "update_s", "sync_s")}
    return summary("project", walls, gen, acc, mon, cmd, split)


def trl_run(a, idx: int, trl_py: Path, data: Path, threads: int) -> dict:
    out = Path(a.work) / "runs" / f"{idx:02d}_T{threads}"
    ws = glob.glob(str(Path(a.work) / "cache" / "sft-*"))
    if len(ws) != 1:
        sys.exit(f"expected one warm start under {a.work}/cache (the project run makes it), found {ws}")
    cmd = [str(trl_py), str(HERE / "trl_grpo.py"), "--data", str(data), "--model", ws[0], "--out", str(out),
           "--threads", str(threads), "--steps", str(a.steps)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    out.mkdir(parents=True, exist_ok=True)
    m = json.loads((data / "meta.json").read_text())["mini_batches"]
    mon = run(cmd, env, out.parent / f"{idx:02d}_T{threads}.log",
              progress=lambda: _count(out / "progress", div=m), window=(a.warmup, a.steps))
    tim = json.loads((out / "timings.json").read_text())
    sb = {int(k): v for k, v in tim["step_begin"].items()}
    se = {int(k): v for k, v in tim["step_end"].items()}
    n = len(sb) // m
    walls = [se[m * (k + 1)] - sb[m * k] for k in range(n)][a.warmup:]  # RL step k = optimizer steps mk..mk+m-1
    gen = tim["gen_tokens"][a.warmup:n]
    return summary(f"trl{threads}", walls, gen, evaluate_hf(str(out / "final")), mon, cmd, {})


def summary(kind, walls, gen, acc, mon, cmd, split) -> dict:
    q = sorted(walls)
    return {"kind": kind, "median": statistics.median(walls), "p10": q[max(0, len(q) // 10 - 1)],
            "gen_tok_s": statistics.median(g / w for g, w in zip(gen, walls)), "peak_pss_gb": mon.peak_pss / 2**30,
            "loop_pss_gb": mon.loop_pss / 2**30, "acc": acc,
            "load": statistics.mean(mon.loads) if mon.loads else float("nan"), "steps": len(walls),
            "split": split, "cmd": " ".join(cmd)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "outputs" / "vs_trl"))
    p.add_argument("--trl-venv", default=None, help="default: WORK/trl-venv")
    p.add_argument("--plan", default="P,T,P,T")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5, help="RL steps left out of the statistics")
    p.add_argument("--project-layout", default="demo", choices=sorted(LAYOUTS))
    p.add_argument("--trl-threads", type=int, default=2)
    a = p.parse_args()
    work = Path(a.work)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    trl_py = ensure_trl_venv(Path(a.trl_venv) if a.trl_venv else work / "trl-venv") if "T" in a.plan else None
    data = export_data(work, a.steps)
    plan = a.plan.split(",")
    if "P" in plan and not glob.glob(str(work / "cache" / "sft-*" / "config.json")):
        plan.remove("P")
        plan.insert(0, "P")  # the first project run makes the warm start TRL starts from
    results = []
    for i, kind in enumerate(plan):
        r = project_run(a, i) if kind == "P" else trl_run(a, i, trl_py, data, 1 if kind == "T1" else a.trl_threads)
        results.append(r)
        print(f"  run {i + 1} {r['kind']}: median {r['median']:.3f} s/step, load {r['load']:.1f}", file=sys.stderr, flush=True)
        (work / "results.json").write_text(json.dumps(results, indent=1))
    trl_med = [r["median"] for r in results if r["kind"] == f"trl{a.trl_threads}"]
    ref = min(trl_med) if trl_med else float("nan")  # TRL's best run: other jobs only slow runs down
    print(f"\n{os.cpu_count()} CPUs; steps {a.warmup + 1}-{a.steps}; "
          f"x = the median s/step of TRL's ({a.trl_threads} threads) fastest run / this run's")
    print("| run | what | s/step median | p10 | generated tok/s | peak PSS in the loop (GB) | peak PSS whole run (GB) "
          "| held-out acc | load avg | x |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(results):
        what = f"project ({a.project_layout})" if r["kind"] == "project" else f"TRL GRPOTrainer ({r['kind'][3:]} threads)"
        print(f"| {i + 1} | {what} | {r['median']:.3f} | {r['p10']:.3f} | {r['gen_tok_s']:.0f} | {r['loop_pss_gb']:.2f} | "
              f"{r['peak_pss_gb']:.2f} | {r['acc']:.3f} | {r['load']:.1f} | {ref / r['median']:.2f} |")
    for i, r in enumerate(results):
        if r["split"]:
            print(f"run {i + 1} stage medians (s): " + ", ".join(f"{k} {v:.3f}" for k, v in r["split"].items()))


if __name__ == "__main__":
    main()
