"""Compatibility shims for Megatron-Core: the CPU backend and Apex-free norms (`cpu`), and its
import on CPU without `torch.compile` decorators (`megatron_import`).

The `cpu` names are resolved on first use so that `megatron_dgpo/__init__.py` can import
`megatron_import` without importing torch."""

__all__ = ["enable_cpu_backend", "cpu_backend_enabled", "TorchNorm"]


def __getattr__(name):
    if name in __all__:
        from megatron_dgpo.compat import cpu

        return getattr(cpu, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
