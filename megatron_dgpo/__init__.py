"""megatron_dgpo: DGPO and RLVR baselines on Megatron-Core."""
from megatron_dgpo.compat import megatron_import as _megatron_import

__version__ = "0.1.0"

# Before any module of the package imports megatron.core: on CPU, skip its torch.compile decorators.
_megatron_import.install()
