"""Launch the DGPO trainer with NeMo-Run: locally (torchrun) or on Slurm (pyxis containers,
multi-node torchrun, optional disaggregated SGLang servers). See docs/cluster.md.

`spec` has no nemo-run dependency; `nemo` (plan_local, plan_slurm, dryrun, submit) imports
`nemo_run` when called.
"""
from .spec import (DEFAULT_GPU_ENV, SGLangServeSpec, SlurmSpec, disagg_overrides, load_train_config,
                   sglang_server_script, sglang_setup_lines, trainer_args, validate)

__all__ = ["DEFAULT_GPU_ENV", "SGLangServeSpec", "SlurmSpec", "disagg_overrides", "load_train_config",
           "sglang_server_script", "sglang_setup_lines", "trainer_args", "validate",
           "plan_local", "plan_slurm", "dryrun", "submit", "LaunchPlan"]


def __getattr__(name):
    if name in ("plan_local", "plan_slurm", "dryrun", "submit", "LaunchPlan"):
        from . import nemo

        return getattr(nemo, name)
    raise AttributeError(name)
