#!/usr/bin/env python
"""Submit examples/train_dgpo.py with NeMo-Run (local torchrun or Slurm). See docs/cluster.md.

Local (CPU or the GPUs of this machine):
    python examples/nemo_run_dgpo.py local --nproc-per-node 2 \\
        --config examples/configs/embedded_cpu.yaml algo.steps=2

Slurm (prints the sbatch script with --dryrun; no cluster needed for that):
    python examples/nemo_run_dgpo.py slurm --dryrun --account ACC --partition batch --nodes 2 \\
        --gpus-per-node 8 --time 04:00:00 --container-image IMAGE --mount /lustre:/lustre \\
        --config examples/configs/r1_distill_qwen_7b.yaml data.train.path=/lustre/math.parquet ...

Disaggregated SGLang rollouts (heterogeneous job: trainer nodes + server nodes):
    ... slurm --sglang-nodes 1 --sglang-servers-per-node 2 [--sglang-model-path /lustre/hf/model]

The config (YAML + key=value overrides) is loaded into megatron_dgpo.config.TrainConfig and
validated here, before anything is submitted. Exit status: 0 when every job succeeded
(or, with --detach, was submitted), 1 when a job failed, 2 on a configuration error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_dgpo.configio import ConfigError  # noqa: E402
from megatron_dgpo.launch import SGLangServeSpec, SlurmSpec  # noqa: E402
from megatron_dgpo.launch.spec import mask_secrets  # noqa: E402


def _kv(items, what):
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"{what} {item!r} is not KEY=VALUE")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="executor", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML config of train_dgpo.py")
    common.add_argument("--name", default=None, help="experiment name")
    common.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable")
    common.add_argument("--base-dir", default=None, help="nemo-run experiment folder (default ~/.nemo_run)")
    common.add_argument("--tail-logs", action="store_true")
    common.add_argument("overrides", nargs="*", help="key=value config overrides")

    lo = sub.add_parser("local", parents=[common], help="torchrun on this machine")
    lo.add_argument("--nproc-per-node", type=int, default=2)

    sl = sub.add_parser("slurm", parents=[common], help="sbatch through nemo-run's SlurmExecutor")
    sl.add_argument("--dryrun", action="store_true", help="print the sbatch script(s), submit nothing")
    sl.add_argument("--detach", action="store_true", help="return after submission")
    sl.add_argument("--account", required=True)
    sl.add_argument("--partition")
    sl.add_argument("--qos")
    sl.add_argument("--nodes", type=int, default=1)
    sl.add_argument("--gpus-per-node", type=int, default=8)
    sl.add_argument("--time", default="04:00:00")
    sl.add_argument("--container-image")
    sl.add_argument("--mount", action="append", default=[], dest="mounts", metavar="SRC:DST")
    sl.add_argument("--job-dir", default="/tmp/nemo_run_jobs", help="nemo-run job folder on the cluster")
    sl.add_argument("--ssh-host", help="submit through run.SSHTunnel (else run.LocalTunnel: on a login node)")
    sl.add_argument("--ssh-user")
    sl.add_argument("--ssh-identity")
    sl.add_argument("--packager", choices=["git", "none"], default="git",
                    help="git: archive HEAD of this repo; none: use the code in the image at --code-dir")
    sl.add_argument("--code-dir", default="/opt/megatron_dgpo")
    sl.add_argument("--no-exclusive", action="store_true")
    sl.add_argument("--sglang-nodes", type=int, default=0, help="> 0: disaggregated SGLang server nodes")
    sl.add_argument("--sglang-servers-per-node", type=int, default=1)
    sl.add_argument("--sglang-model-path", help="HF folder for the servers (default warmstart.init_hf_path)")
    sl.add_argument("--sglang-port", type=int, default=30000)
    sl.add_argument("--sglang-router", choices=["auto", "on", "off"], default="auto")
    sl.add_argument("--sglang-arg", action="append", default=[], help="extra sglang.launch_server argument")
    sl.add_argument("--sglang-container-image", help="image of the server nodes (default: --container-image)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    from megatron_dgpo.launch import nemo

    env = _kv(args.env, "--env")
    try:
        if args.executor == "local":
            plan = nemo.plan_local(args.config, args.overrides, args.nproc_per_node, env,
                                   name=args.name or "dgpo-local")
        else:
            slurm = SlurmSpec(account=args.account, partition=args.partition, qos=args.qos, nodes=args.nodes,
                              gpus_per_node=args.gpus_per_node, time=args.time,
                              container_image=args.container_image, container_mounts=args.mounts,
                              env_vars=env, job_dir=args.job_dir, ssh_host=args.ssh_host,
                              ssh_user=args.ssh_user, ssh_identity=args.ssh_identity,
                              packager=args.packager, code_dir=args.code_dir, exclusive=not args.no_exclusive)
            serve = None
            if args.sglang_nodes > 0:
                serve = SGLangServeSpec(nodes=args.sglang_nodes, servers_per_node=args.sglang_servers_per_node,
                                        model_path=args.sglang_model_path, port=args.sglang_port,
                                        router={"auto": None, "on": True, "off": False}[args.sglang_router],
                                        extra_args=args.sglang_arg,
                                        container_image=args.sglang_container_image)
            plan = nemo.plan_slurm(args.config, args.overrides, slurm, serve, name=args.name or "dgpo",
                                   check_paths=not args.dryrun)
    except (ConfigError, ValueError) as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    for note in plan.notes:
        print(note)
    if getattr(args, "dryrun", False):
        for fname, text in nemo.dryrun(plan, args.base_dir).items():
            print(f"#=== {fname} ===")
            print(mask_secrets(text, env))
        return 0
    code, states = nemo.submit(plan, args.base_dir, detach=getattr(args, "detach", False),
                               tail_logs=args.tail_logs)
    for job, st in states.items():
        print(f"job {job}: {', '.join(st)}")
    print("OK" if code == 0 else "FAILED", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
