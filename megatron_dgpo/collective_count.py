"""Count the collectives (and their bytes) this rank issues, by RL stage: a measuring aid for tests
and benchmarks, so that a change that adds collectives to an RL step is seen.

    with CollectiveCounter() as cc:
        instrument_trainer(trainer, cc)     # stages: rollout, reward, old_logp, update, sync
        trainer.step(0)
    print(cc.table())

It wraps the public `torch.distributed` functions while active. Callers that look them up at call
time (`torch.distributed.all_reduce(...)`, `dist.all_reduce(...)`: Megatron's TP mappings, DDP,
the optimizer's grad-norm reduction, this project) are counted; the c10d internals of an object
collective (`all_gather_object` = a size exchange + one buffer) count as the one call made.
Bytes are this rank's input tensor (the pickled object for object collectives).
"""
from __future__ import annotations

import contextlib
import functools
import pickle
from collections import defaultdict

import torch
import torch.distributed as dist

# name -> index of the positional argument whose bytes this rank contributes
_TENSOR_ARG = {"all_reduce": 0, "broadcast": 0, "reduce": 0, "send": 0, "recv": 0, "isend": 0, "irecv": 0,
               "gather": 0, "scatter": 0, "all_gather": 1, "all_gather_into_tensor": 1, "_all_gather_base": 1,
               "reduce_scatter": 1, "reduce_scatter_tensor": 1, "_reduce_scatter_base": 1,
               "all_to_all": 1, "all_to_all_single": 1, "barrier": None, "batch_isend_irecv": 0,
               "all_gather_object": 1, "broadcast_object_list": 0, "gather_object": 0, "scatter_object_list": 1}
_OBJECT = {"all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list"}


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    if hasattr(x, "tensor"):  # P2POp
        return _nbytes(x.tensor)
    return 0


class CollectiveCounter:
    def __init__(self):
        self.current = "other"
        self.calls = defaultdict(lambda: defaultdict(int))  # stage -> op -> calls
        self.bytes = defaultdict(int)  # stage -> bytes
        self._saved = {}
        self._depth = 0

    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if self._depth:  # a collective called by another one (object collectives, P2P batches)
                return fn(*args, **kwargs)
            i = _TENSOR_ARG.get(name)
            arg = args[i] if i is not None and len(args) > i else None
            if name in _OBJECT:
                try:
                    n = len(pickle.dumps(arg if name != "all_gather_object" else args[1]))
                except Exception:  # noqa: BLE001 - a count without bytes is still a count
                    n = 0
            else:
                n = _nbytes(arg)
            self.calls[self.current][name] += 1
            self.bytes[self.current] += n
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return wrapper

    def __enter__(self):
        for name in _TENSOR_ARG:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved[name] = fn
                setattr(dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()

    @contextlib.contextmanager
    def stage(self, name: str):
        prev, self.current = self.current, name
        try:
            yield
        finally:
            self.current = prev

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()

    def summary(self) -> dict:
        """{stage: {"calls": n, "bytes": b, "ops": {op: n}}}"""
        return {s: {"calls": sum(ops.values()), "bytes": self.bytes[s], "ops": dict(ops)}
                for s, ops in self.calls.items()}

    def table(self) -> str:
        lines = ["| stage | collectives | bytes | by op |", "|---|---|---|---|"]
        for s, v in sorted(self.summary().items()):
            ops = ", ".join(f"{k} {n}" for k, n in sorted(v["ops"].items()))
            lines.append(f"| {s} | {v['calls']} | {v['bytes']} | {ops} |")
        return "\n".join(lines)


def instrument_trainer(tr, cc: CollectiveCounter) -> None:
    """Attribute an RLTrainer's collectives to its stages (wraps the functions its step calls)."""
    from megatron_dgpo.rl import old_logp, rollout_stage

    def staged(name, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            with cc.stage(name):
                return fn(*a, **k)
        return wrapper

    for mod, attr, stage in ((rollout_stage, "generate", "rollout"), (rollout_stage, "score", "reward"),
                             (old_logp, "with_old_logp", "old_logp")):
        fn = getattr(mod, attr)
        setattr(mod, attr, staged(stage, getattr(fn, "__wrapped__", fn)))
    tr.policy.update = staged("update", tr.policy.update)
    tr.sync = staged("sync", tr.sync)
