import time

import pytest

from megatron_dgpo.reward import (ExactMatchReward, MathVerifyReward, RewardConfig, RewardFn,
                                  check_answer, make_reward_fn)


def test_exact_match():
    r = ExactMatchReward()
    assert isinstance(r, RewardFn)
    rewards, stats = r.score(["357", " 357\n", "356", "3570", ""], ["357"] * 5)
    assert rewards == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert stats["reward/mean"] == pytest.approx(0.4)
    with pytest.raises(ValueError):
        r.score(["1"], [])
    assert isinstance(make_reward_fn(RewardConfig(kind="exact")), ExactMatchReward)


@pytest.mark.parametrize("resp,gt,ok", [
    (r"The answer is \boxed{\frac{1}{2}}.", "0.5", True),
    (r"The answer is \boxed{\frac{1}{2}}.", "1/2", True),
    (r"\boxed{0.5}", r"\frac{1}{2}", True),
    ("so the result is 1/2", "0.5", True),
    (r"We get $x = \boxed{3}$", "3", True),
    (r"\boxed{1,000}", "1000", True),
    (r"\boxed{\frac{1}{3}}", "0.5", False),
    (r"\boxed{2}", "3", False),
    ("I don't know", "3", False),
    (r"\boxed{x^2+1}", "1+x^2", True),
])
def test_check_answer_equivalences(resp, gt, ok):
    # check_answer has no time limit, but these inputs are all trivial
    assert check_answer(resp, gt) is ok


@pytest.fixture(scope="module")
def pool():
    p = MathVerifyReward(num_workers=2, timeout_s=1.5, debug_hooks=True)
    yield p
    p.close()


def test_pool_scores_in_order(pool):
    resp = [r"\boxed{\frac{1}{2}}", r"\boxed{2}", "0.5", r"\boxed{7}"] * 3
    gts = ["1/2", "3", r"\frac{1}{2}", "7"] * 3
    rewards, stats = pool.score(resp, gts)
    assert rewards == [1.0, 0.0, 1.0, 1.0] * 3
    assert stats["reward/timeouts"] == 0 and stats["reward/crashes"] == 0
    assert stats["reward/mean"] == pytest.approx(0.75)


def test_pool_real_adversarial_input_times_out(pool):
    # Verifying 9^(9^(9^9)) against 1 makes sympy build a gigantic integer in C code, which
    # signal.alarm cannot interrupt (measured: > 5 s, unbounded); only killing the worker helps.
    resp = [r"\boxed{9^{9^{9^{9}}}}", r"\boxed{4}"]
    t = time.monotonic()
    rewards, stats = pool.score(resp, ["1", "4"])
    elapsed = time.monotonic() - t
    assert rewards == [0.0, 1.0]
    assert stats["reward/timeouts"] == 1
    assert elapsed < 1.5 + 3.0
    # the pool still works afterwards, with a replacement worker
    assert pool.score([r"\boxed{5}"] * 3, ["5"] * 3)[0] == [1.0] * 3


def test_pool_sleep_hook_and_crash(pool):
    before = dict(pool.totals)
    resp = ["__SLEEP__:30", r"\boxed{1}", "__CRASH__", r"\boxed{2}", "__SLEEP__:30", r"\boxed{3}"]
    t = time.monotonic()
    rewards, stats = pool.score(resp, ["1", "1", "1", "2", "1", "3"])
    # two sequential 1.5 s timeouts at most share the two workers, plus respawning them (seconds on a
    # loaded machine: 10.7 s once with 16 busy cores); bounded below one 30 s sleep
    assert time.monotonic() - t < 25
    assert rewards == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert stats["reward/timeouts"] == 2 and stats["reward/crashes"] == 1
    assert pool.totals["timeouts"] - before["timeouts"] == 2
    assert pool.score([r"\boxed{\frac{2}{4}}"], ["0.5"])[0] == [1.0]
    assert all(w.proc.is_alive() for w in pool._workers)


def test_close_stops_workers():
    p = MathVerifyReward(num_workers=1, timeout_s=2.0)
    procs = [w.proc for w in p._workers]
    assert p.score(["42"], ["42"])[0] == [1.0]
    p.close()
    assert all(not pr.is_alive() for pr in procs)
    with pytest.raises(RuntimeError):
        p.score(["1"], ["1"])
