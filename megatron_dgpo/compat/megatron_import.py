"""Import Megatron-Core on a CPU machine without its `torch.compile` decorators.

`megatron.core.jit.jit_fuser` is `torch.compile` on torch >= 2.2, and Megatron applies it as a
decorator when its modules are imported (`fusions/fused_bias_geglu.py`, `fused_bias_gelu.py`,
`fused_bias_swiglu.py`, ... all reached from `import megatron.core` through
`transformer/transformer_config.py`). Each `torch.compile(fn)` looks up the inductor backend,
which imports inductor's compiler (`torch._inductor.compile_fx`, its code generators) and
networkx: for functions this project never calls on CPU (the fusions they implement are off in
its configs; a CPU run has no compiler toolchain to give them anyway). Measured on the 2-core
machine, `import megatron.core` plus the model, schedule, optimizer and dist-checkpointing
modules: 2.5 s and 299 MB anonymous memory -> 1.5 s and 258 MB, in every process.

`install()` (called by `megatron_dgpo/__init__.py`; it imports nothing) adds a one-shot
meta-path finder for `megatron.core`. When `megatron.core` is first imported and CUDA is not
available, the import runs with `torch.compile` bound to an identity decorator, then the real
`torch.compile` is restored and Megatron's own `megatron.core.jit.disable_jit_fuser()` is called,
so modules imported later get Megatron's no-op decorator. Only the import is affected:
`torch.compile` is the real one afterwards, for Megatron and everyone else. With CUDA, or when
`megatron.core` was imported before `megatron_dgpo`, nothing changes.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import sys

_TARGET = "megatron.core"


def _identity_compile(model=None, **_kwargs):
    """Stands for `torch.compile` in both its forms: `@torch.compile` and `@torch.compile(...)`."""
    return model if model is not None else (lambda fn: fn)


@contextlib.contextmanager
def _compile_is_identity():
    import torch

    if torch.cuda.is_available():
        yield False
        return
    real = torch.compile
    torch.compile = _identity_compile
    try:
        yield True
    finally:
        torch.compile = real


class _Loader(importlib.abc.Loader):
    """Delegates to the real loader; runs `megatron/core/__init__.py` under `_compile_is_identity`."""

    def __init__(self, real):
        self._real = real

    def create_module(self, spec):
        return self._real.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self._real
        if module.__spec__ is not None:
            module.__spec__.loader = self._real
        with _compile_is_identity() as swapped:
            self._real.exec_module(module)
        if swapped:
            jit = sys.modules.get("megatron.core.jit")
            if jit is not None and hasattr(jit, "disable_jit_fuser"):
                jit.disable_jit_fuser()
            # torch.optim.Optimizer.add_param_group is @torch._disable_dynamo, which imports
            # torch._dynamo on its first call; an import made there leaves a reference cycle through
            # the caller's frames, so the first optimizer's model and state outlive it until the
            # cyclic gc runs (tests/workers/memory_worker.py). Imported here, at import time, the
            # cycle holds only import frames.
            import torch._dynamo  # noqa: F401

    def __getattr__(self, name):
        return getattr(self._real, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        uninstall()
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    """Idempotent; a no-op once `megatron.core` is imported."""
    if _TARGET in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]
