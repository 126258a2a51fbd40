"""Atomic checkpoint writes and the `latest` pointer (in-process, world of one)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "workers"))
import megatron_common as C  # noqa: E402


@pytest.fixture(scope="module")
def model():
    from megatron_dgpo import distributed

    chunks, opt = C.setup(1, 1)
    yield chunks, opt
    distributed.destroy()


def _weights(chunks):
    return C.full_state_dict(chunks)


def _step(chunks, opt):
    from megatron_dgpo.train import train_step

    batch = C.make_batch()
    batch = batch.with_old_logp(C.perturb_old_logp(torch.zeros(batch.tokens.shape)))
    return train_step(chunks, opt, batch, C.loss_config(), micro_batch_size=4)


def test_crash_mid_save_keeps_last_good_checkpoint(model, tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    from megatron_dgpo.checkpoint import latest_checkpoint, load_checkpoint, read_meta, save_checkpoint

    chunks, opt = model
    root = str(tmp_path / "ckpt")
    save_checkpoint(root, 1, chunks, opt)
    _step(chunks, opt)
    save_checkpoint(root, 2, chunks, opt, extra={"epoch": 3})
    good = _weights(chunks)
    assert latest_checkpoint(root).endswith("step_00000002")
    assert read_meta(latest_checkpoint(root))["extra"] == {"epoch": 3}

    _step(chunks, opt)  # weights move on, then the save of step 3 "crashes" half-way
    real_save = dist_checkpointing.save

    def crashing_save(*, sharded_state_dict, checkpoint_dir, **kw):
        with open(os.path.join(checkpoint_dir, "__0_0.distcp"), "wb") as f:
            f.write(b"partial")
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(dist_checkpointing, "save", crashing_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_checkpoint(root, 3, chunks, opt)
    monkeypatch.setattr(dist_checkpointing, "save", real_save)
    assert os.path.isdir(os.path.join(root, ".tmp.step_00000003"))
    assert not os.path.exists(os.path.join(root, "step_00000003"))
    assert latest_checkpoint(root).endswith("step_00000002")

    step = load_checkpoint(root, chunks, opt)
    assert step == 2
    ok, detail = C.compare_weights(_weights(chunks), good, tol=0.0)
    assert ok, detail

    # The next save cleans the leftovers and moves `latest`.
    save_checkpoint(root, 3, chunks, opt, keep_last=2)
    assert not os.path.exists(os.path.join(root, ".tmp.step_00000003"))
    assert latest_checkpoint(root).endswith("step_00000003")
    assert sorted(e for e in os.listdir(root) if e.startswith("step_")) == ["step_00000002", "step_00000003"]


def test_missing_checkpoint_and_bad_requests(model, tmp_path):
    from megatron_dgpo.checkpoint import load_checkpoint, save_checkpoint

    chunks, opt = model
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "nothing"), chunks, opt)
    root = str(tmp_path / "weights_only")
    save_checkpoint(root, 5, chunks, None)
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(root, chunks, opt)
    assert load_checkpoint(root, chunks, opt, load_optimizer=False) == 5


def test_optimizer_saved_before_any_update_resumes(tmp_path):
    """A plain (non-distributed) optimizer that never stepped (e.g. every RL step skipped) saves
    step 0, which Megatron drops; loading it must still work and the next step must match."""
    from megatron_dgpo import distributed
    from megatron_dgpo.checkpoint import load_checkpoint, save_checkpoint

    distributed.destroy()
    chunks, opt = C.setup(1, 1, seed=3)
    root = str(tmp_path / "fresh")
    save_checkpoint(root, 0, chunks, opt)
    expected = _step(chunks, opt)
    after = _weights(chunks)
    chunks2, opt2 = C.setup(1, 1, seed=4)
    assert load_checkpoint(root, chunks2, opt2) == 0
    got = _step(chunks2, opt2)
    assert got["loss"] == expected["loss"] and got["grad_norm"] == expected["grad_norm"]
    ok, detail = C.compare_weights(_weights(chunks2), after, tol=0.0)
    assert ok, detail
    distributed.destroy()
