"""The math-verify pool survives its workers dying at every point (issue 11, item 5): while idle
(the send fails), while checking an answer (retried once on a fresh worker) and while starting up
(respawned), with the answers of later calls unaffected (no phantom crash)."""
import os
import signal
import threading
import time

import pytest

from megatron_dgpo.reward import MathVerifyReward


def _kill(w):
    os.kill(w.proc.pid, signal.SIGKILL)
    w.proc.join(timeout=10)


@pytest.fixture
def pool():
    p = MathVerifyReward(num_workers=1, timeout_s=20.0, debug_hooks=True)
    yield p
    p.close()


def test_worker_killed_while_idle(pool):
    assert pool.score([r"\boxed{2}"], ["2"])[0] == [1.0]  # started and idle
    _kill(pool._workers[0])
    rewards, stats = pool.score([r"\boxed{1}", r"\boxed{2}", r"\boxed{3}"], ["1", "2", "3"])
    assert rewards == [1.0, 1.0, 1.0] and stats["reward/crashes"] == 0 and stats["reward/respawns"] >= 1, stats
    rewards, stats = pool.score([r"\boxed{1}", r"\boxed{2}", r"\boxed{3}"], ["1", "2", "3"])  # no phantom
    assert rewards == [1.0, 1.0, 1.0] and stats["reward/crashes"] == 0 and stats["reward/respawns"] == 0, stats


def test_worker_killed_mid_answer_is_retried_once(pool):
    pool.score([r"\boxed{2}"], ["2"])
    victim = pool._workers[0]

    def killer():
        deadline = time.monotonic() + 30
        while victim.task is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        _kill(victim)

    t = threading.Thread(target=killer)
    t.start()
    rewards, stats = pool.score([r"__SLEEP__:2:\boxed{3}", r"\boxed{4}"], ["3", "4"])
    t.join()
    assert rewards == [1.0, 1.0], stats
    assert stats["reward/retries"] == 1 and stats["reward/crashes"] == 0, stats
    # an answer that kills every worker it meets: retried once, then 0 and counted
    rewards, stats = pool.score(["__CRASH__", r"\boxed{5}"], ["1", "5"])
    assert rewards == [0.0, 1.0] and stats["reward/crashes"] == 1 and stats["reward/retries"] == 1, stats


def test_worker_dying_during_startup_is_respawned():
    p = MathVerifyReward(num_workers=1, timeout_s=20.0)
    try:
        assert not p._workers[0].ready
        _kill(p._workers[0])  # dies before it said "ready"
        rewards, stats = p.score([r"\boxed{7}"], ["7"])
        assert rewards == [1.0] and stats["reward/respawns"] == 1, stats
    finally:
        p.close()
