"""Where an RL step's old log-probs come from (algo.old_logp_source, rl/old_logp.py): the choice
of `auto` per engine and dtype, the on-policy shortcut's conditions, and that `trainer` recomputes
while `rollout` / `on_policy` run no forward. The numerical equivalences run under torchrun in
tests/test_rl_step_paths.py."""
from pathlib import Path

import pytest
import torch

from megatron_dgpo.config import TrainConfig
from megatron_dgpo.configio import load_config
from megatron_dgpo.rl import old_logp
from megatron_dgpo.train import pad_sequences

CONFIG = str(Path(__file__).resolve().parents[1] / "examples" / "configs" / "embedded_cpu.yaml")


def cfg(*over):
    return load_config(TrainConfig, CONFIG, list(over))


@pytest.mark.parametrize("over, want", [
    ((), "rollout"),  # the embedded default: 4 mini-batches, fp32, the engine runs the trainer's weights
    (("rollout.engine=sglang",), "trainer"),
    (("rollout.engine=sglang", "algo.mini_batches=2"), "trainer"),
    (("parallel.params_dtype=bfloat16",), "trainer"),
    (("algo.old_logp_source=trainer",), "trainer"),
    (("rollout.engine=sglang", "algo.old_logp_source=rollout"), "rollout"),
    (("algo.mini_batches=1",), "on_policy"),
    (("algo.mini_batches=1", "rollout.engine=sglang"), "on_policy"),
    (("algo.mini_batches=1", "algo.epochs=2"), "rollout"),
    (("algo.mini_batches=1", "algo.tis_cap=2.0", "rollout.engine=sglang"), "trainer"),
])
def test_plan(over, want):
    c = cfg(*over)
    assert old_logp.plan(c) == want
    assert want.replace("on_policy", "on policy") in old_logp.describe(c)


def test_sglang_auto_recomputes_embedded_auto_does_not():
    class CountingPolicy:
        calls = 0

        def logprobs(self, batch, temperature):
            self.calls += 1
            return batch.rollout_logp + 0.25

    batch = pad_sequences([[1, 2], [1, 3]], [[4, 5], [6]], torch.tensor([1.0, -1.0]),
                          rollout_logp=[[-0.5, -0.7], [-0.2]])
    pol = CountingPolicy()
    out, gap, _ = old_logp.with_old_logp(pol, batch, old_logp.plan(cfg("rollout.engine=sglang")), 1.0)
    assert pol.calls == 1 and torch.equal(out.old_logp, batch.rollout_logp + 0.25)
    assert gap == pytest.approx(0.25)
    for how in ("rollout", "on_policy"):
        out, gap, secs = old_logp.with_old_logp(pol, batch, how, 1.0)
        assert pol.calls == 1 and secs == 0.0 and gap != gap  # no forward, gap left to the update
        assert out.old_logp is (batch.rollout_logp if how == "rollout" else None)
