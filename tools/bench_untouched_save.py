"""Adam state a checkpoint of a never-stepped optimizer allocates: none on this branch, against the zero
moments the save created before (checkpoint._ensure_optimizer_state, what it called). One process,
TP=1; model.vocab_size=131072 gives the per-rank share of the 262,144-vocabulary embedded job at TP=2.

    PYTHONPATH=. OMP_NUM_THREADS=1 python tools/bench_untouched_save.py
"""
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_dgpo.config import TrainConfig  # noqa: E402
from megatron_dgpo.configio import load_config  # noqa: E402
from megatron_dgpo import checkpoint, distributed as mdist  # noqa: E402
from megatron_dgpo.rl.policy import Policy  # noqa: E402
from megatron_dgpo.train.lifetime import inner_optimizers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def state_bytes(opt):
    return sum(t.numel() * t.element_size() for o in inner_optimizers(opt) for st in o.state.values()
               for t in st.values() if torch.is_tensor(t))


if __name__ == "__main__":
    cfg = load_config(TrainConfig, os.path.join(ROOT, "examples", "configs", "embedded_cpu.yaml"),
                      ["parallel.tensor_model_parallel_size=1", "model.vocab_size=131072"])
    mdist.initialize(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=1)
    pol = Policy(cfg)
    with tempfile.TemporaryDirectory() as d:
        checkpoint.save_checkpoint(d, 0, pol.chunks, pol.optimizer)
        print(f"Adam state after saving an untouched optimizer (this branch): {state_bytes(pol.optimizer) / 2**20:.1f} MiB")
        checkpoint._ensure_optimizer_state(pol.optimizer)  # what the save did before this branch
        print(f"zero state the earlier save allocated: {state_bytes(pol.optimizer) / 2**20:.1f} MiB")
