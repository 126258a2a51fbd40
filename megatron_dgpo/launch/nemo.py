"""NeMo-Run tasks and executors for the DGPO trainer (needs `pip install megatron-dgpo[launch]`).

* `plan_local`: `run.Script` of examples/train_dgpo.py on `run.LocalExecutor(ntasks_per_node=N,
  launcher="torchrun")`.
* `plan_slurm`: the same script on `run.SlurmExecutor` (pyxis container, torchrun launcher: one
  srun task per node, `torchrun --nnodes N --nproc-per-node G` with a c10d rendezvous on the first
  node), through `run.SSHTunnel` or `run.LocalTunnel`. With an `SGLangServeSpec` it becomes a
  heterogeneous job: group 0 the trainer nodes, group 1 the SGLang server nodes (+ sglang-router).
* `dryrun`: the generated sbatch script(s), without a cluster.
* `submit`: runs the experiment and turns the final job states into an exit code (nemo-run's own
  `run.run` / `Experiment.run` do not raise when a job fails).
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from . import spec as S


def _nemo_run():
    try:
        import nemo_run as run
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("nemo-run is not installed: pip install 'nemo-run==0.11.1' 'leptonai==0.27.3' "
                          "(or `pip install -e .[launch]`)") from e
    return run


@dataclass
class LaunchPlan:
    name: str
    tasks: list  # run.Script
    executors: list  # one per task
    task_names: list[str]
    group: bool = False  # True: one heterogeneous Slurm job (a JobGroup)
    notes: list[str] = field(default_factory=list)


def _local_path(p: str) -> str:
    return str(Path(p).resolve())


def _remote_path(p: str, slurm: S.SlurmSpec) -> str:
    """A repo file as the job sees it: relative to the packaged code (git) or under code_dir."""
    path = Path(p)
    if path.is_absolute():
        try:
            path = path.resolve().relative_to(S.REPO_ROOT)
        except ValueError:
            return str(p)  # outside the repo: must exist at this path on the cluster
    return str(path) if slurm.packager == "git" else f"{slurm.code_dir.rstrip('/')}/{path}"


# ----------------------------------------------------------------------------------------------
def plan_local(config: Optional[str], overrides: Sequence[str], nproc_per_node: int = 2,
               env: Optional[dict] = None, name: str = "dgpo-local") -> LaunchPlan:
    """Validate the config, then one torchrun task on this machine (CPU or GPUs)."""
    S.validate(config, overrides, check_paths=True)
    run = _nemo_run()
    # torchrun must be this interpreter's, also when its virtual environment is not activated.
    bin_dir = os.path.dirname(sys.executable)
    env_vars = {"OMP_NUM_THREADS": "1", "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    env_vars.update(env or {})
    script = run.Script(path=_local_path(str(S.REPO_ROOT / S.TRAIN_SCRIPT)),
                        args=S.trainer_args(_local_path(config) if config else None, overrides),
                        entrypoint="python")
    executor = run.LocalExecutor(ntasks_per_node=nproc_per_node, launcher="torchrun", env_vars=env_vars)
    return LaunchPlan(name, [script], [executor], ["train"])


def _tunnel(run, slurm: S.SlurmSpec):
    if slurm.ssh_host:
        kw = {"identity": slurm.ssh_identity} if slurm.ssh_identity else {}
        return run.SSHTunnel(host=slurm.ssh_host, user=slurm.ssh_user or os.environ.get("USER", ""),
                             job_dir=slurm.job_dir, **kw)
    return run.LocalTunnel(job_dir=slurm.job_dir)


def _packager(run, slurm: S.SlurmSpec):
    if slurm.packager == "git":
        return run.GitArchivePackager()
    return run.Packager()


def _slurm_executor(run, slurm: S.SlurmSpec, *, nodes: int, ntasks_per_node: int, launcher, env: dict,
                    **extra):
    kw = dict(account=slurm.account, partition=slurm.partition, nodes=nodes, ntasks_per_node=ntasks_per_node,
              gpus_per_node=slurm.gpus_per_node, time=slurm.time, container_image=slurm.container_image,
              container_mounts=list(slurm.container_mounts), env_vars=dict(env), tunnel=_tunnel(run, slurm),
              packager=_packager(run, slurm), launcher=launcher, mem=slurm.mem)
    if slurm.qos:
        kw["qos"] = slurm.qos
    if slurm.exclusive:
        kw["exclusive"] = True
    if slurm.cpus_per_task:
        kw["cpus_per_task"] = slurm.cpus_per_task
    kw.update(extra)
    return run.SlurmExecutor(**kw)


def plan_slurm(config: Optional[str], overrides: Sequence[str], slurm: S.SlurmSpec,
               serve: Optional[S.SGLangServeSpec] = None, name: str = "dgpo", check_paths: bool = True
               ) -> LaunchPlan:
    """Validate the config, then the Slurm task(s): trainer only, or trainer + SGLang servers.
    `check_paths=False` (dry runs) accepts the CHANGE_ME placeholders of the example configs."""
    cfg = S.validate(config, overrides, serve, slurm.gpus_per_node, check_paths=check_paths, nodes=slurm.nodes)
    run = _nemo_run()
    env = dict(S.DEFAULT_GPU_ENV)
    env.update(slurm.env_vars)
    # secrets travel in the environment sbatch runs in (set here for a local submission), never
    # in the script; the script only checks that they arrived
    env, secrets = S.split_secrets(env)
    os.environ.update({k: slurm.env_vars[k] for k in secrets if slurm.env_vars.get(k)})
    checks = S.secret_check_lines(secrets)
    conf = _remote_path(config, slurm) if config else None
    if serve is None:
        script = run.Script(path=_remote_path(S.TRAIN_SCRIPT, slurm), args=S.trainer_args(conf, overrides),
                            entrypoint="python")
        executor = _slurm_executor(run, slurm, nodes=slurm.nodes, ntasks_per_node=slurm.gpus_per_node,
                                   launcher="torchrun", env=env, **({"setup_lines": checks} if checks else {}))
        return LaunchPlan(name, [script], [executor], ["train"])

    model_path = serve.model_path or cfg.warmstart.init_hf_path
    train_over = list(overrides) + S.disagg_overrides(serve, slurm.gpus_per_node)
    args = ["--timeout", str(serve.health_timeout_s), "--"] + S.trainer_args(conf, train_over)
    train = run.Script(inline=S.torchrun_inline(slurm.nodes, slurm.gpus_per_node,
                                                _remote_path(S.WAIT_SCRIPT, slurm), args, slurm.rdzv_port))
    servers = run.Script(inline=S.sglang_server_script(serve, model_path, slurm.gpus_per_node,
                                                       deterministic=cfg.rollout.sglang.deterministic))
    setup = "\n".join(x for x in (checks, S.sglang_setup_lines(serve)) if x)
    train_ex = _slurm_executor(run, slurm, nodes=slurm.nodes, ntasks_per_node=1, launcher=None, env=env,
                               heterogeneous=True, setup_lines=setup)
    serve_ex = _slurm_executor(run, slurm, nodes=serve.nodes, ntasks_per_node=serve.servers_per_node,
                               launcher=None, env=env)
    if serve.container_image:
        serve_ex.container_image = serve.container_image
    notes = [f"{serve.num_servers} SGLang server(s), TP {serve.tp_size(slurm.gpus_per_node)}, model {model_path}"]
    return LaunchPlan(name, [train, servers], [train_ex, serve_ex], ["train", "sglang"], group=True, notes=notes)


# ----------------------------------------------------------------------------------------------
def _experiment(run, plan: LaunchPlan, base_dir: Optional[str]):
    kw = dict(log_level="WARN", enable_goodbye_message=False)
    if base_dir:
        kw["base_dir"] = str(base_dir)
    exp = run.Experiment(plan.name, executor=plan.executors[0], **kw)
    return exp


def _add(exp, plan: LaunchPlan):
    if plan.group:
        exp.add(plan.tasks, executor=plan.executors, name=plan.name)
    else:
        for task, ex, n in zip(plan.tasks, plan.executors, plan.task_names):
            exp.add(task, executor=ex, name=n)


def dryrun(plan: LaunchPlan, base_dir: Optional[str] = None) -> dict[str, str]:
    """{file name: text} of what nemo-run would submit to Slurm, without a cluster: the sbatch
    script(s) first, then the inline task scripts they run. Nothing is kept on disk."""
    run = _nemo_run()
    with _experiment(run, plan, base_dir) as exp:
        _add(exp, plan)
        exp.dryrun(log=False, delete_exp_dir=False)
        exp_dir = getattr(exp, "_exp_dir")
        files = sorted(glob.glob(os.path.join(exp_dir, "*_sbatch.sh")))
        files += sorted(glob.glob(os.path.join(exp_dir, "*", "scripts", "*.sh")))
        out = {os.path.relpath(p, exp_dir): Path(p).read_text() for p in files}
        shutil.rmtree(exp_dir, ignore_errors=True)
    return out


def _states(job) -> list[str]:
    states = getattr(job, "states", None)
    if states is None:
        states = [getattr(job, "state", None)]
    return [getattr(s, "name", str(s)) for s in states]


def submit(plan: LaunchPlan, base_dir: Optional[str] = None, detach: bool = False,
           tail_logs: bool = False) -> tuple[int, dict[str, list[str]]]:
    """Run the plan; wait unless `detach` (Slurm). Returns (exit code, {job id: final states}).

    Exit code 0 only when every job ended SUCCEEDED (or, detached, was submitted)."""
    run = _nemo_run()
    with _experiment(run, plan, base_dir) as exp:
        _add(exp, plan)
        exp.run(detach=detach, tail_logs=tail_logs)
        jobs = list(exp.jobs)
    # Leaving the context waits for every job (unless detached) and records its final state.
    states = {job.id: _states(job) for job in jobs}
    if detach:
        ok = all(getattr(job, "launched", True) for job in jobs)
        return (0 if ok else 1), states
    ok = all(s == "SUCCEEDED" for v in states.values() for s in v)
    return (0 if ok else 1), states
