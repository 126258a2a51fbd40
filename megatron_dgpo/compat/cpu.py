"""Run Megatron-Core on CPU processes with the gloo backend (tests, laptops, CI).

`enable_cpu_backend()` redirects the CUDA assumptions of Megatron-Core to the CPU. It is a
no-op when CUDA is available and idempotent. It touches no global `torch` attribute for the
lifetime of the process: instead, each Megatron module listed in `TORCH_PROXY_MODULES` gets
its module-global name `torch` replaced by `_CpuTorch`, a proxy that forwards every attribute
to the real `torch` except

* `torch.cuda.current_device()` -> `torch.device("cpu")` (tensor allocations in
  `utils.GlobalMemoryBuffer.get_tensor` (attention), `tensor_parallel/mappings.py`,
  `tensor_parallel/layers.py`, `tensor_parallel/utils.py`, p2p buffers in
  `pipeline_parallel/p2p_communication.py`, `distributed/param_and_grad_buffer.py`,
  `optimizer/distrib_optimizer.py`, `models/common/embeddings/rotary_pos_embedding.py`,
  `transformer/attention.py`, `transformer/dot_product_attention.py`, `models/gpt/gpt_model.py`,
  the dist-checkpoint savers);
* `torch.cuda.synchronize()` / `empty_cache()` -> no-ops (p2p communication, DDP, dist-ckpt
  preload in `strategies/filesystem_async.py`, `parallel_state`);
* `torch.cuda.get_rng_state / set_rng_state / manual_seed` -> the CPU default generator
  (`tensor_parallel/random.py`: `CudaRNGStatesTracker.add`, `model_parallel_cuda_manual_seed`,
  activation checkpointing). The tracker therefore keeps CPU generator states, and its
  `fork()` swaps the CPU default generator, which is what the model-parallel weight init and
  dropout draw from on CPU;
* `torch.cuda.Stream / stream / current_stream / default_stream / Event` -> inert stand-ins
  (DDP grad-sync communication stream, `param_and_grad_buffer.py`; 0.19 needs them);
* the tensor factories (`zeros, ones, empty, full, tensor, arange, *_like, rand, randn`) map a
  literal `device="cuda"` / `"cuda:N"` to the CPU (`pipeline_parallel/schedules.py` token
  counters, `optimizer/optimizer.py` found_inf / scale buffers, `optimizer/clip_grads.py`,
  `dist_checkpointing/strategies/state_dict_saver.py`, `utils.py`, the causal mask in
  `transformer/utils.get_default_causal_mask` used by the local attention).

Besides the proxy, five narrow function patches:

* `tensor_parallel.random._get_cuda_rng_state` / `_set_cuda_rng_state` are replaced by
  `torch.get_rng_state` / `torch.set_rng_state` (they index `torch.cuda.default_generators`),
  and the tracker's "CPU RNG state changed within GPU RNG context" warning is filtered (on CPU
  the "GPU" state *is* the CPU state, so it would fire on every fork).
* `clip_grads.clip_grad_by_total_norm_fp32` (asserts `grad.type() == 'torch.cuda.FloatTensor'`),
  `DistributedOptimizer._build_model_and_main_param_groups` and
  `Float16OptimizerWithFloat16Params.__init__` (compare `param.type()` with `torch.cuda.*`
  names) run with `Tensor.type()` temporarily reporting CPU tensors under their `torch.cuda.*`
  name, for the duration of that call only.

* `LanguageModule.setup_embeddings_and_output_layer` (tied embeddings with PP > 1 does
  `weight.data = weight.data.cuda()` before all-reducing the initial embedding over the
  embedding group) runs with `Tensor.cuda()` returning the tensor itself, during that call only.

Not covered (not reached by this project on CPU): other `Tensor.cuda()` calls: optimizer CPU
offload, `utils.check_param_hashes_across_dp_replicas`, the fully-parallel dist-ckpt
load/save wrappers (`exchange_utils.py`, use the plain strategies on CPU), `torch.autocast("cuda")`
in the schedule (only with `config.enable_autocast`), CUDA graphs, TE, FP8.

* `P2PCommunicator._communicate_shapes` (pipeline stages with variable micro-batch shapes) uses
  Megatron's ordered unbatched `_p2p_ops` when `config.batch_p2p_comm` is False (below).

Related, set outside this module: `TransformerConfig.batch_p2p_comm=False` on gloo (builder and
`train.step.prepare_model_config`): gloo's batched isend/irecv between one pair of ranks
(PP=2: prev == next) can match an activation with a gradient of the same shape, which gave
wrong losses with the interleaved schedule and segfaults with 4 ranks.

Related: the local layer spec's `WrappedTorchNorm` asserts `not sequence_parallel` when Apex is
absent (CPU, or GPU without Apex). `TorchNorm` below is a torch LayerNorm/RMSNorm that marks its
parameters `sequence_parallel` so `finalize_model_grads` all-reduces their grads over TP;
`megatron_dgpo.model.builder` uses it for the local spec.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types

import torch

__all__ = ["enable_cpu_backend", "cpu_backend_enabled", "TorchNorm", "TORCH_PROXY_MODULES"]

# Megatron modules whose global `torch` is replaced by the CPU proxy (missing ones are skipped,
# so the list covers 0.16.x and 0.19.x).
TORCH_PROXY_MODULES = (
    "megatron.core.utils",
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.module",
    "megatron.core.tensor_parallel.data",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.torch",
)

_ENABLED = False
_CPU = torch.device("cpu")


def _cpu_device(device):
    """Map 'cuda', 'cuda:N', torch.device('cuda', N) or an int index to the CPU."""
    if device is None:
        return None
    if isinstance(device, int):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


def _redirect_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if kwargs.pop("pin_memory", False):
            pass  # pinned memory needs CUDA
        return fn(*args, **kwargs)

    return wrapper


class _NullStream:
    """Stand-in for torch.cuda.Stream on CPU: every operation is synchronous already."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event if event is not None else _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _CpuCuda(types.ModuleType):
    """`torch.cuda` as seen by the proxied Megatron modules."""

    def __init__(self):
        super().__init__("torch.cuda")

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return _CPU

    @staticmethod
    def synchronize(device=None):
        return None

    @staticmethod
    def empty_cache():
        return None

    @staticmethod
    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state, device="cuda"):
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)

    @staticmethod
    def manual_seed_all(seed):
        torch.manual_seed(seed)

    Stream = _NullStream
    Event = _NullEvent

    @staticmethod
    def stream(stream=None):
        return contextlib.nullcontext()

    @staticmethod
    def current_stream(device=None):
        return _NullStream()

    @staticmethod
    def default_stream(device=None):
        return _NullStream()


_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "empty_like", "zeros_like",
              "ones_like", "full_like", "rand", "randn", "randint", "as_tensor")


class _CpuTorch(types.ModuleType):
    """`torch` as seen by the proxied Megatron modules (see the module docstring)."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, _redirect_factory(getattr(torch, name)))

    def __getattr__(self, name):
        value = getattr(torch, name)
        if not name.startswith("__"):
            # Cache plain attributes so later look-ups skip __getattr__.
            object.__setattr__(self, name, value)
        return value


@contextlib.contextmanager
def _cuda_type_names():
    """Within the block, `cpu_tensor.type()` reports 'torch.cuda.<Type>' (see docstring)."""
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


@contextlib.contextmanager
def _tensor_cuda_is_noop():
    """Within the block, `tensor.cuda()` returns the tensor unchanged (see docstring)."""
    original = torch.Tensor.cuda

    def cuda(self, *args, **kwargs):
        return self

    torch.Tensor.cuda = cuda
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _with_tensor_cuda_noop(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _tensor_cuda_is_noop():
            return fn(*args, **kwargs)

    wrapper.__megatron_dgpo_cpu__ = True
    return wrapper


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    wrapper.__megatron_dgpo_cpu__ = True
    return wrapper


class _DropForkWarning(logging.Filter):
    def filter(self, record):
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _import(name):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def cpu_backend_enabled() -> bool:
    return _ENABLED


def enable_cpu_backend(force: bool = False) -> bool:
    """Patch Megatron-Core for CPU execution. Returns True if the CPU backend is active.

    No-op (returns False) when CUDA is available, unless `force` (tests only).
    Idempotent. Call before building models / optimizers (megatron_dgpo.distributed.initialize
    does it).
    """
    global _ENABLED
    if _ENABLED:
        return True
    if torch.cuda.is_available() and not force:
        return False

    proxy = _CpuTorch()
    for name in TORCH_PROXY_MODULES:
        mod = _import(name)
        if mod is not None and getattr(mod, "torch", None) is torch:
            mod.torch = proxy

    random = _import("megatron.core.tensor_parallel.random")
    random._get_cuda_rng_state = _cpu_get_rng_state
    random._set_cuda_rng_state = _cpu_set_rng_state
    logging.getLogger(random.__name__).addFilter(_DropForkWarning())

    clip_grads = _import("megatron.core.optimizer.clip_grads")
    optimizer = _import("megatron.core.optimizer.optimizer")
    if clip_grads is not None:
        patched = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
        for mod in (clip_grads, optimizer, _import("megatron.core.optimizer.distrib_optimizer")):
            if mod is not None and hasattr(mod, "clip_grad_by_total_norm_fp32"):
                mod.clip_grad_by_total_norm_fp32 = patched
    if optimizer is not None and hasattr(optimizer, "Float16OptimizerWithFloat16Params"):
        cls = optimizer.Float16OptimizerWithFloat16Params
        cls.__init__ = _with_cuda_type_names(cls.__init__)
    distrib = _import("megatron.core.optimizer.distrib_optimizer")
    if distrib is not None:
        cls = distrib.DistributedOptimizer
        raw = cls.__dict__.get("_build_model_and_main_param_groups")
        if isinstance(raw, staticmethod):
            cls._build_model_and_main_param_groups = staticmethod(_with_cuda_type_names(raw.__func__))
        elif isinstance(raw, classmethod):
            cls._build_model_and_main_param_groups = classmethod(_with_cuda_type_names(raw.__func__))
        elif raw is not None:
            cls._build_model_and_main_param_groups = _with_cuda_type_names(raw)
    lm = _import("megatron.core.models.common.language_module.language_module")
    if lm is not None and hasattr(lm.LanguageModule, "setup_embeddings_and_output_layer"):
        cls = lm.LanguageModule
        cls.setup_embeddings_and_output_layer = _with_tensor_cuda_noop(cls.setup_embeddings_and_output_layer)
    p2p = _import("megatron.core.pipeline_parallel.p2p_communication")
    if p2p is not None and hasattr(p2p, "P2PCommunicator") and hasattr(p2p, "_p2p_ops"):
        p2p.P2PCommunicator._communicate_shapes = _ordered_communicate_shapes(
            p2p.P2PCommunicator._communicate_shapes, p2p._p2p_ops)
    _ENABLED = True
    return True


def _ordered_communicate_shapes(batched, p2p_ops):
    """`P2PCommunicator._communicate_shapes` (variable_seq_lengths: stages exchange the shape of
    the next activation / gradient first) always uses batch_isend_irecv, whose gloo matching
    between one pair of ranks is unreliable (see batch_p2p_comm above). With
    `config.batch_p2p_comm=False` this exchanges the shapes with Megatron's own ordered,
    unbatched `_p2p_ops`, as the activations themselves are."""
    def communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
        if self.config.batch_p2p_comm or self.config.use_ring_exchange_p2p:
            return batched(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next)

        def shape(t):
            return None if t is None else torch.tensor(list(t.size()), dtype=torch.int64)
        r_prev = torch.empty((3,), dtype=torch.int64) if recv_prev else None
        r_next = torch.empty((3,), dtype=torch.int64) if recv_next else None
        reqs = p2p_ops(tensor_send_prev=shape(tensor_send_prev), tensor_recv_prev=r_prev,
                       tensor_send_next=shape(tensor_send_next), tensor_recv_next=r_next,
                       group=self.pp_group, prev_pipeline_rank=self.prev_rank,
                       next_pipeline_rank=self.next_rank)
        for req in (reqs.values() if isinstance(reqs, dict) else reqs):
            req.wait()
        return (r_prev.tolist() if r_prev is not None else [0, 0, 0],
                r_next.tolist() if r_next is not None else [0, 0, 0])

    return communicate_shapes


class TorchNorm(torch.nn.Module):
    """torch LayerNorm / RMSNorm usable with sequence parallelism (Apex-free local spec).

    Same constructor as Megatron's norm modules. Parameters carry `sequence_parallel` so that
    `finalize_model_grads` all-reduces their gradients over the TP group when SP is on.
    The parameter is named `weight` (and `bias` for LayerNorm), like WrappedTorchNorm, so state
    dicts and dist checkpoints are unchanged.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__()
        self.normalization = config.normalization
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        if self.normalization == "LayerNorm":
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        elif self.normalization == "RMSNorm":
            self.bias = None
        else:
            raise ValueError(f"TorchNorm: unsupported normalization {self.normalization!r}")
        for p in self.parameters():
            setattr(p, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x):
        if self.normalization == "RMSNorm":
            return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
