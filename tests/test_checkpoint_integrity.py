"""Checkpoints: damaged ones are refused, untrusted ones execute nothing, `--resume` never
restarts a run silently, one run per output folder (issue 11, items 2 and 3). In-process, world of one."""
import io
import json
import os
import pickle
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


class _Evil:
    """Unpickling it would create `marker` (what a malicious checkpoint could do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _rehash(path):
    from megatron_dgpo.checkpoint_trust import write_digests
    write_digests(path)  # an attacker ships a consistent manifest


def test_flipped_bytes_in_a_shard_are_refused(model, tmp_path):
    from megatron_dgpo.checkpoint import load_checkpoint, save_checkpoint
    from megatron_dgpo.checkpoint_trust import DIGESTS, CheckpointIntegrityError

    chunks, opt = model
    path = save_checkpoint(str(tmp_path / "ck"), 1, chunks, opt)
    assert os.path.isfile(os.path.join(path, DIGESTS))
    assert load_checkpoint(path, chunks, opt) == 1  # intact: loads (RNG byte items included)
    shard = sorted(f for f in os.listdir(path) if f.endswith(".distcp"))[0]
    with open(os.path.join(path, shard), "r+b") as f:
        f.seek(os.path.getsize(os.path.join(path, shard)) // 2)
        block = f.read(4096)
        f.seek(-len(block), 1)
        f.write(bytes(b ^ 0xFF for b in block))
    with pytest.raises(CheckpointIntegrityError, match=shard):
        load_checkpoint(path, chunks, opt)
    os.remove(os.path.join(path, shard))
    with pytest.raises(CheckpointIntegrityError, match=f"{shard}: missing"):
        load_checkpoint(path, chunks, opt)
    path = save_checkpoint(str(tmp_path / "ck"), 2, chunks, opt)
    open(os.path.join(path, "__9_9.distcp"), "wb").close()
    with pytest.raises(CheckpointIntegrityError, match="not in the manifest"):
        load_checkpoint(path, chunks, opt)


def test_malicious_dcp_metadata_executes_nothing(model, tmp_path):
    from megatron_dgpo.checkpoint import load_checkpoint, save_checkpoint
    from megatron_dgpo.checkpoint_trust import UntrustedCheckpointError

    chunks, opt = model
    path = save_checkpoint(str(tmp_path / "ck"), 1, chunks, opt)
    marker = str(tmp_path / "pwned")
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(_Evil(marker), f)
    _rehash(path)
    with pytest.raises(UntrustedCheckpointError, match="os.makedirs"):
        load_checkpoint(path, chunks, opt)
    assert not os.path.exists(marker), "unpickling .metadata ran code"


def test_malicious_byte_item_executes_nothing(tmp_path):
    from megatron_dgpo.checkpoint_trust import UntrustedCheckpointError, _safe_torch_load

    marker = str(tmp_path / "pwned")
    buf = io.BytesIO()
    torch.save({"state": _Evil(marker)}, buf)
    buf.seek(0)
    with pytest.raises(UntrustedCheckpointError):
        _safe_torch_load(buf)
    assert not os.path.exists(marker)
    import numpy as np  # what our RNG ShardedObject holds still loads
    state = {"np": np.random.get_state(), "torch": torch.get_rng_state(), "random": (3, (1, 2), None)}
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    back = _safe_torch_load(buf)
    assert np.array_equal(back["np"][1], state["np"][1]) and torch.equal(back["torch"], state["torch"])


# ----------------------------------------------------------------------------- resume / run dir
def _fake_ckpt(root, step, complete=True):
    d = os.path.join(root, f"step_{step:08d}")
    os.makedirs(d)
    if complete:
        for name in ("dgpo_meta.json", ".metadata"):
            open(os.path.join(d, name), "w").close()
    return d


def test_resume_checkpoint_choice(tmp_path):
    from megatron_dgpo.checkpoint import CheckpointError, latest_checkpoint, resume_checkpoint

    root = str(tmp_path / "ck")
    assert resume_checkpoint(root) == (None, "")  # nothing there: a fresh start
    s1, s2 = _fake_ckpt(root, 1), _fake_ckpt(root, 2)
    _fake_ckpt(root, 3, complete=False)
    latest = os.path.join(root, "latest")
    for text in ("step_00000099", "../../etc", "/tmp", "step_00000003", "", "\xff" * 300):
        with open(latest, "w") as f:
            f.write(text)
        path, note = resume_checkpoint(root)
        assert path == s2 and "newest complete" in note, (text, path, note)
        assert latest_checkpoint(root) is None
    with open(latest, "w") as f:
        f.write("step_00000001\n")
    assert resume_checkpoint(root) == (s1, "")
    # Outside the root even when the directory exists and is complete.
    outside = _fake_ckpt(str(tmp_path), 7)
    with open(latest, "w") as f:
        f.write(os.path.relpath(outside, root))
    assert resume_checkpoint(root)[0] == s2
    os.remove(os.path.join(s1, ".metadata")), os.remove(os.path.join(s2, ".metadata"))
    with pytest.raises(CheckpointError, match="no complete"):
        resume_checkpoint(root)


def test_run_dir_lock_refusal_and_overwrite(tmp_path):
    from megatron_dgpo.rundir import RunDirError, open_run_dir

    out = tmp_path / "run"
    first = open_run_dir(str(out), resume=False, overwrite=False)
    with pytest.raises(RunDirError, match="in use"):
        open_run_dir(str(out), resume=True, overwrite=False)
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    _fake_ckpt(str(out / "checkpoints"), 1)
    first.close()
    with pytest.raises(RunDirError, match="--overwrite"):
        open_run_dir(str(out), resume=False, overwrite=False)
    assert (out / "checkpoints" / "step_00000001").is_dir()
    (out / "checkpoints" / "step_00000001" / ".metadata").unlink()  # only an incomplete checkpoint
    with pytest.raises(RunDirError, match="cannot resume"):
        open_run_dir(str(out), resume=True, overwrite=False)
    import shutil
    shutil.rmtree(out / "checkpoints")
    with pytest.raises(RunDirError, match="no checkpoint"):  # metrics but nothing to resume from
        open_run_dir(str(out), resume=True, overwrite=False)
    _fake_ckpt(str(out / "checkpoints"), 2)
    rd = open_run_dir(str(out), resume=False, overwrite=True)
    assert not (out / "checkpoints").exists() and "removed" in rd.note
    rd.close()
    rd = open_run_dir(str(tmp_path / "empty"), resume=True, overwrite=False)
    assert rd.resume_from is None and "starting at step 0" in rd.note
    rd.close()
