"""FP8 training switch: one dataclass mapped onto Megatron-Core's TransformerConfig FP8 fields.

The TransformerConfig field names (`fp8`, `fp8_recipe`, `fp8_param`, `fp8_margin`,
`fp8_interval`, `fp8_amax_history_len`, `fp8_amax_compute_algo`, `fp8_wgrad`,
`fp8_dot_product_attention`, `fp8_multi_head_attention`) are the same in megatron-core 0.16.x
and 0.19.x. FP8 GEMMs are done by Transformer Engine, so FP8 needs: transformer_engine
importable, a CUDA device of compute capability >= 8.9 (Ada/Hopper; mxfp8 needs >= 10.0,
Blackwell), and the TE layer spec (`transformer_impl="transformer_engine"`).

GEMM row alignment: TE needs the number of tokens in a GEMM to be a multiple of 16 (32 for
mxfp8); `FP8Config.sequence_multiple()` returns that (matching
`megatron.core.fp8_utils.get_fp8_align_size`), and the batch code pads sequences to it.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Optional

import torch

FORMATS = ("e4m3", "hybrid")
RECIPES = ("tensorwise", "delayed", "mxfp8", "blockwise")
# Minimum CUDA compute capability per recipe.
MIN_CAPABILITY = {"tensorwise": (8, 9), "delayed": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}
TE_INSTALL_HINT = "pip install '.[te]'  (transformer-engine[pytorch]; needs a CUDA build of torch)"


class FP8ConfigError(ValueError):
    """FP8 was requested in a configuration that cannot run it."""


@dataclass
class FP8Config:
    enabled: bool = False
    format: str = "hybrid"  # e4m3 everywhere, or hybrid (e4m3 forward, e5m2 gradients)
    recipe: str = "tensorwise"  # tensorwise (current scaling) | delayed | mxfp8 | blockwise
    fp8_param: bool = False  # keep GEMM weights in FP8 (saves memory; needs distributed optimizer)
    margin: int = 0
    interval: int = 1
    amax_history_len: int = 1024  # delayed scaling only
    amax_compute_algo: str = "max"  # delayed scaling only: max | most_recent
    wgrad: bool = True  # FP8 weight-gradient GEMMs
    dot_product_attention: bool = False
    multi_head_attention: bool = False

    def __post_init__(self):
        if self.format not in FORMATS:
            raise FP8ConfigError(f"FP8Config.format={self.format!r}: expected one of {FORMATS}")
        if self.recipe not in RECIPES:
            raise FP8ConfigError(f"FP8Config.recipe={self.recipe!r}: expected one of {RECIPES}")
        if self.amax_compute_algo not in ("max", "most_recent"):
            raise FP8ConfigError(
                f"FP8Config.amax_compute_algo={self.amax_compute_algo!r}: expected 'max' or 'most_recent'")
        if self.amax_history_len < 1 or self.interval < 1 or self.margin < 0:
            raise FP8ConfigError("FP8Config: amax_history_len and interval must be >= 1, margin >= 0")
        if self.fp8_param and not self.enabled:
            raise FP8ConfigError("FP8Config.fp8_param=True needs enabled=True")

    @classmethod
    def coerce(cls, value) -> Optional["FP8Config"]:
        """None / False -> None; a dict -> FP8Config(**dict); a recipe string -> enabled config."""
        if value is None or value is False:
            return None
        if isinstance(value, FP8Config):
            return value if value.enabled else None
        if isinstance(value, dict):
            cfg = cls(**value)
            return cfg if cfg.enabled else None
        if isinstance(value, str):
            return cls(enabled=True, recipe=value)
        raise FP8ConfigError(f"cannot interpret fp8={value!r}")

    def sequence_multiple(self) -> int:
        """Token-count alignment TE needs for FP8 GEMMs (1 when disabled)."""
        if not self.enabled:
            return 1
        return 32 if self.recipe == "mxfp8" else 16

    def transformer_config_kwargs(self) -> dict:
        """TransformerConfig keyword arguments (empty dict when disabled)."""
        if not self.enabled:
            return {}
        return dict(
            fp8=self.format,
            fp8_recipe=self.recipe,
            fp8_param=self.fp8_param,
            fp8_margin=self.margin,
            fp8_interval=self.interval,
            fp8_amax_history_len=self.amax_history_len,
            fp8_amax_compute_algo=self.amax_compute_algo,
            fp8_wgrad=self.wgrad,
            fp8_dot_product_attention=self.dot_product_attention,
            fp8_multi_head_attention=self.multi_head_attention,
        )

    def validate(self, *, transformer_impl: str = "transformer_engine",
                 device_capability: Optional[tuple] = None, te_available: Optional[bool] = None,
                 use_distributed_optimizer: Optional[bool] = None) -> None:
        """Raise FP8ConfigError naming the first requirement that is not met.

        `device_capability` / `te_available` default to the current machine (tests inject them).
        """
        if not self.enabled:
            return
        if te_available is None:
            te_available = importlib.util.find_spec("transformer_engine") is not None
        if not te_available:
            raise FP8ConfigError(
                f"FP8 (recipe {self.recipe!r}) needs Transformer Engine, which is not importable. "
                f"Install it with: {TE_INSTALL_HINT}")
        if transformer_impl != "transformer_engine":
            raise FP8ConfigError(
                f"FP8 needs the Transformer Engine layer spec: build the model with "
                f"transformer_impl='transformer_engine' (got {transformer_impl!r})")
        if device_capability is None:
            if not torch.cuda.is_available():
                raise FP8ConfigError("FP8 needs a CUDA device; none is available")
            device_capability = torch.cuda.get_device_capability()
        need = MIN_CAPABILITY[self.recipe]
        if tuple(device_capability) < need:
            raise FP8ConfigError(
                f"FP8 recipe {self.recipe!r} needs a GPU of compute capability >= {need[0]}.{need[1]}"
                f" ({'Blackwell' if need >= (10, 0) else 'Ada/Hopper'}); this device has "
                f"{device_capability[0]}.{device_capability[1]}")
        if self.fp8_param and use_distributed_optimizer is False:
            raise FP8ConfigError("FP8Config.fp8_param=True needs the distributed optimizer "
                                 "(use_distributed_optimizer=True)")
