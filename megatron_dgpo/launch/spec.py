"""What a launch needs, independent of NeMo-Run: the validated training config, the trainer's
command line, the Slurm / SGLang-server settings and the shell snippets of a disaggregated job.

Nothing here imports `nemo_run`, so the config checks and the generated shell text can be tested
(and used by other launchers) without it.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from megatron_dgpo.config import TrainConfig
from megatron_dgpo.configio import load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = "examples/train_dgpo.py"
WAIT_SCRIPT = "megatron_dgpo/launch/wait_then_train.py"

# Environment variables the disaggregated job exports for its steps (set in the sbatch script).
ENV_SERVER_URLS = "DGPO_SGLANG_URLS"  # comma-separated http://host:port of every SGLang server
ENV_ROUTER_URL = "DGPO_SGLANG_ROUTER"  # http://host:port of sglang-router (when started)
ENV_TRAIN_MASTER = "DGPO_TRAIN_MASTER"  # first trainer node: the torchrun rendezvous endpoint
# Per-job key the SGLang servers and router require (--api-key) and our client sends; generated on
# the allocation by the batch script, so it is never written to a file or a log.
ENV_SGLANG_API_KEY = "DGPO_SGLANG_API_KEY"
SECRET_MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD")

# Defaults for multi-node NCCL over InfiniBand; every value can be overridden with --env KEY=VALUE.
# NCCL_SOCKET_IFNAME / NCCL_IB_HCA are cluster specific and deliberately not guessed here.
DEFAULT_GPU_ENV = {
    "NCCL_DEBUG": "WARN",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # Megatron TP/SP comm-compute overlap expects it
    "OMP_NUM_THREADS": "8",
}


@dataclass
class SlurmSpec:
    account: str
    partition: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 8
    time: str = "04:00:00"
    container_image: Optional[str] = None
    container_mounts: list[str] = field(default_factory=list)
    env_vars: dict[str, str] = field(default_factory=dict)
    qos: Optional[str] = None
    exclusive: bool = True
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = "0"  # all of each node's memory
    # Where nemo-run keeps job files on the cluster (a shared filesystem) and how to reach it:
    # an SSH tunnel (host set) or the local machine (running on a login node).
    job_dir: str = "/tmp/nemo_run_jobs"
    ssh_host: Optional[str] = None
    ssh_user: Optional[str] = None
    ssh_identity: Optional[str] = None
    # "git": nemo-run archives HEAD of this repo into the job dir (uncommitted changes are NOT
    # included); "none": use the code baked into the container image at `code_dir`.
    packager: str = "git"
    code_dir: str = "/opt/megatron_dgpo"
    rdzv_port: int = 29500

    def __post_init__(self):
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError("SlurmSpec: nodes and gpus_per_node must be >= 1")
        if self.packager not in ("git", "none"):
            raise ValueError(f"SlurmSpec.packager={self.packager!r}: expected 'git' or 'none'")


@dataclass
class SGLangServeSpec:
    """SGLang servers on their own nodes of the same (heterogeneous) Slurm job."""
    nodes: int = 1
    servers_per_node: int = 1  # each server gets gpus_per_node // servers_per_node GPUs (its TP size)
    model_path: Optional[str] = None  # HF folder inside the container; default: warmstart.init_hf_path
    port: int = 30000  # server i on a node listens on port + i
    router: Optional[bool] = None  # start sglang-router; None: when there is more than one server
    router_port: int = 30100
    extra_args: list[str] = field(default_factory=list)  # e.g. ["--mem-fraction-static", "0.85"]
    health_timeout_s: float = 3600.0  # the trainer waits this long for every server's /health
    nccl_port: int = 29600  # trainer rank 0 <-> servers weight-broadcast rendezvous
    container_image: Optional[str] = None  # servers' image (e.g. an official SGLang one); default: the trainer's

    def __post_init__(self):
        if self.nodes < 1 or self.servers_per_node < 1:
            raise ValueError("SGLangServeSpec: nodes and servers_per_node must be >= 1")

    @property
    def num_servers(self) -> int:
        return self.nodes * self.servers_per_node

    def tp_size(self, gpus_per_node: int) -> int:
        if gpus_per_node % self.servers_per_node:
            raise ValueError(f"servers_per_node={self.servers_per_node} does not divide gpus_per_node={gpus_per_node}")
        return gpus_per_node // self.servers_per_node

    def use_router(self) -> bool:
        return self.num_servers > 1 if self.router is None else bool(self.router)


def is_secret(name: str) -> bool:
    return any(m in name.upper() for m in SECRET_MARKERS)


def split_secrets(env: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """(what may be written into the batch script, names of secret-looking variables). Secrets
    reach the job through the environment sbatch runs in (Slurm exports it by default), never
    in clear text in the script or a dry run."""
    plain = {k: v for k, v in env.items() if not is_secret(k)}
    return plain, sorted(k for k in env if is_secret(k))


def secret_check_lines(names: Sequence[str]) -> str:
    """Batch-script lines that stop the job at once, naming the variable, when a secret did not
    arrive through the environment (e.g. a submission over SSH whose shell lacks it)."""
    return "\n".join(f': "${{{n}:?{n} must be set in the environment sbatch runs in (not written to this script)}}"'
                     for n in names)


def mask_secrets(text: str, env: dict[str, str]) -> str:
    """`text` with the value of every secret-looking variable of `env` replaced by ***."""
    for k, v in env.items():
        if is_secret(k) and v:
            text = text.replace(v, "***")
    return text


def load_train_config(config: Optional[str], overrides: Sequence[str] = ()) -> TrainConfig:
    """The same typed config train_dgpo.py builds; raises ConfigError before anything is submitted."""
    return load_config(TrainConfig, config, list(overrides))


def disagg_overrides(serve: SGLangServeSpec, gpus_per_node: int) -> list[str]:
    """Trainer overrides of a disaggregated run; the server URLs and the NCCL master address are
    only known on the allocation and are appended by wait_then_train.py from the environment."""
    return ["rollout.engine=sglang", "rollout.sglang.mode=server",
            f"rollout.sglang.tp_size={serve.tp_size(gpus_per_node)}",
            f"rollout.sglang.nccl_master_port={serve.nccl_port}"]


def placeholder_urls(serve: SGLangServeSpec) -> list[str]:
    return [f"http://sglang-{i}:{serve.port}" for i in range(serve.num_servers)]


PLACEHOLDER = "CHANGE_ME"


def unset_placeholders(cfg: TrainConfig, extra: Sequence[Optional[str]] = ()) -> list[str]:
    """Config paths still holding the CHANGE_ME placeholders of the example GPU configs."""
    named = {"warmstart.init_hf_path": cfg.warmstart.init_hf_path, "data.tokenizer": cfg.data.tokenizer,
             "data.train.path": cfg.data.train.path if cfg.data.task == "file" else None,
             "data.eval.path": cfg.data.eval.path if cfg.data.eval is not None else None,
             "rollout.sglang.model_path": cfg.rollout.sglang.model_path}
    out = [k for k, v in named.items() if v and PLACEHOLDER in v]
    return out + [v for v in extra if v and PLACEHOLDER in v]


def validate(config: Optional[str], overrides: Sequence[str], serve: Optional[SGLangServeSpec] = None,
             gpus_per_node: int = 8, check_paths: bool = False, nodes: Optional[int] = None) -> TrainConfig:
    """Load the config as the trainer will see it (with placeholder server URLs when disaggregated)
    and check what the launch itself depends on. `check_paths`: also refuse the CHANGE_ME
    placeholders of the example configs (for a real submission; a dry run may keep them).
    `nodes`: the trainer's node count; the parallel layout must then fit nodes x gpus_per_node."""
    overrides = list(overrides)
    if serve is not None:
        overrides = overrides + disagg_overrides(serve, gpus_per_node) + [
            "rollout.sglang.server_urls=[" + ",".join(placeholder_urls(serve)) + "]"]
    cfg = load_train_config(config, overrides)
    if nodes is not None:
        from megatron_dgpo.launch.layout_check import check_layout

        check_layout(cfg, nodes, gpus_per_node)
    ro = cfg.rollout
    if serve is not None:
        if not (serve.model_path or cfg.warmstart.init_hf_path):
            raise ValueError("disaggregated SGLang needs a model: set --sglang-model-path or warmstart.init_hf_path")
    elif ro.engine == "sglang" and ro.sglang.mode == "server" and not ro.sglang.server_urls:
        raise ValueError("rollout.engine=sglang in server mode needs servers: start them with the job "
                         "(--sglang-nodes N) or set rollout.sglang.server_urls=[http://host:port,...]")
    if check_paths:
        left = unset_placeholders(cfg, [serve.model_path] if serve is not None else [])
        if left:
            raise ValueError(f"set these before submitting (placeholders {PLACEHOLDER}): {left}")
    return cfg


def trainer_args(config: Optional[str], overrides: Sequence[str]) -> list[str]:
    """Arguments of examples/train_dgpo.py (and of wait_then_train.py, which forwards them)."""
    args = ["--config", str(config)] if config else []
    return args + list(overrides)


def sglang_setup_lines(serve: SGLangServeSpec, server_group: int = 1, train_group: int = 0) -> str:
    """Batch-script lines (run once, before any srun) exporting the server URLs, the router URL and
    the trainer's first node for the job's steps."""
    ports = " ".join(str(serve.port + i) for i in range(serve.servers_per_node))
    lines = [
        "# the servers' per-job API key: made here, inherited by every step, never written down",
        f'export {ENV_SGLANG_API_KEY}="$(python3 -c "import secrets; print(secrets.token_urlsafe(32))")"',
        "# disaggregated SGLang rollouts: where the servers and the trainer's first node are",
        f'dgpo_sglang_hosts=( $(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_{server_group}") )',
        "dgpo_urls=''",
        'for h in "${dgpo_sglang_hosts[@]}"; do',
        f"  for p in {ports}; do dgpo_urls+=\"http://$h:$p,\"; done",
        "done",
        f'export {ENV_SERVER_URLS}="${{dgpo_urls%,}}"',
        f'export {ENV_TRAIN_MASTER}=$(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_{train_group}" | head -n1)',
    ]
    if serve.use_router():
        lines.append(f'export {ENV_ROUTER_URL}="http://${{dgpo_sglang_hosts[0]}}:{serve.router_port}"')
    lines.append(f'echo "SGLang servers: ${ENV_SERVER_URLS}; trainer master: ${ENV_TRAIN_MASTER}"')
    return "\n".join(lines)


def sglang_server_args(serve: SGLangServeSpec, model_path: str, gpus_per_node: int, port: str = "$port",
                       deterministic: bool = False) -> list[str]:
    """`python -m sglang.launch_server` arguments (shell words; $-variables expand in the task).
    The servers listen on every interface (the trainer is on other nodes) and require the job's
    API key for every endpoint but /health; with rollout.sglang.deterministic they honour the
    per-sample seeds the client sends."""
    args = ["--model-path", shlex.quote(model_path), "--host", "0.0.0.0", "--port", f'"{port}"',
            "--tp-size", str(serve.tp_size(gpus_per_node)), "--api-key", f'"${ENV_SGLANG_API_KEY}"']
    if deterministic:
        args.append("--enable-deterministic-inference")
    return args + [shlex.quote(a) for a in serve.extra_args]


def router_args(serve: SGLangServeSpec) -> list[str]:
    """`python -m sglang_router.launch_router` arguments; the router authenticates to the servers
    with the job's key."""
    return ["--host", "0.0.0.0", "--port", str(serve.router_port), "--api-key", f'"${ENV_SGLANG_API_KEY}"',
            "--worker-urls", f'$(echo "${ENV_SERVER_URLS}" | tr \',\' \' \')']


def sglang_server_script(serve: SGLangServeSpec, model_path: str, gpus_per_node: int,
                         deterministic: bool = False) -> str:
    """Bash run by every task of the server group (servers_per_node tasks per node): one
    `sglang.launch_server` on its slice of the node's GPUs; task 0 also runs sglang-router."""
    tp = serve.tp_size(gpus_per_node)
    router = ""
    if serve.use_router():
        router = f"""
if [ "${{SLURM_PROCID:-0}}" = "0" ]; then
  # one entry point for evaluation / external clients; the trainer talks to each server directly
  # (weight updates must reach every server, which a router does not fan out)
  "${{DGPO_SGLANG_PYTHON:-python}}" -m sglang_router.launch_router {" ".join(router_args(serve))} &
fi"""
    return f"""set -euo pipefail
local_id=${{SLURM_LOCALID:-0}}
first_gpu=$(( local_id * {tp} ))
export CUDA_VISIBLE_DEVICES=$(seq -s, $first_gpu $(( first_gpu + {tp} - 1 )))
port=$(( {serve.port} + local_id ))
echo "sglang server on $(hostname):$port GPUs $CUDA_VISIBLE_DEVICES"{router}
exec "${{DGPO_SGLANG_PYTHON:-python}}" -m sglang.launch_server \\
  {" ".join(sglang_server_args(serve, model_path, gpus_per_node, deterministic=deterministic))}
"""


def torchrun_inline(nodes: int, nproc_per_node: int, script: str, args: Sequence[str], rdzv_port: int,
                    master_env: str = ENV_TRAIN_MASTER) -> str:
    """The trainer command of a heterogeneous job, where the torchrun launcher cannot be used
    (nemo-run 0.11 applies one launcher to every task of a heterogeneous group)."""
    argv = " ".join(shlex.quote(a) for a in args)
    return f"""set -euo pipefail
exec torchrun --nnodes {nodes} --nproc-per-node {nproc_per_node} --node-rank "$SLURM_NODEID" \\
  --rdzv-backend c10d --rdzv-endpoint "${master_env}:{rdzv_port}" --rdzv-id "$SLURM_JOB_ID" \\
  {script} {argv}
"""
