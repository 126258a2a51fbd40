"""Checkpoint of an optimizer that never stepped (issue 18): no Adam state is allocated to save it,
and loading it gives the optimizer as it was (world of one, plain and distributed optimizer)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "workers"))
import megatron_common as C  # noqa: E402


def _step(chunks, opt):
    from megatron_dgpo.train import train_step

    batch = C.make_batch()
    batch = batch.with_old_logp(C.perturb_old_logp(torch.zeros(batch.tokens.shape)))
    return train_step(chunks, opt, batch, C.loss_config(), micro_batch_size=4)


def _state_tensors(opt):
    from megatron_dgpo.train.lifetime import inner_optimizers

    return sum(len(o.state) for o in inner_optimizers(opt))


@pytest.mark.parametrize("dist_opt", [False, True], ids=["plain", "distributed"])
def test_untouched_optimizer_saved_without_state(tmp_path, dist_opt):
    from megatron_dgpo import distributed
    from megatron_dgpo.checkpoint import load_checkpoint, read_meta, save_checkpoint

    distributed.destroy()
    chunks, opt = C.setup(1, 1, seed=3, dist_opt=dist_opt)
    root = str(tmp_path / "fresh")
    path = save_checkpoint(root, 0, chunks, opt)
    assert _state_tensors(opt) == 0  # nothing allocated for the save
    assert read_meta(path)["optimizer_untouched"]
    expected = _step(chunks, opt)
    after = C.full_state_dict(chunks)
    # Into an optimizer that has stepped (other weights, Adam moments): back to the saved state.
    chunks2, opt2 = C.setup(1, 1, seed=4, dist_opt=dist_opt)
    _step(chunks2, opt2)
    assert _state_tensors(opt2) > 0
    assert load_checkpoint(root, chunks2, opt2) == 0
    assert _state_tensors(opt2) == 0
    got = _step(chunks2, opt2)
    assert got["loss"] == expected["loss"] and got["grad_norm"] == expected["grad_norm"]
    ok, detail = C.compare_weights(C.full_state_dict(chunks2), after, tol=0.0)
    assert ok, detail
    # After a step the optimizer is saved as before (its moments).
    path = save_checkpoint(root, 1, chunks2, opt2)
    assert not read_meta(path)["optimizer_untouched"]
    distributed.destroy()
