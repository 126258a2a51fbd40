"""Compatibility shims for Megatron-Core (CPU backend, Apex-free norms)."""
from megatron_dgpo.compat.cpu import TorchNorm, cpu_backend_enabled, enable_cpu_backend

__all__ = ["enable_cpu_backend", "cpu_backend_enabled", "TorchNorm"]
