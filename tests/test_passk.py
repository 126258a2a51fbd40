import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_dgpo.eval import avg_at_k, benchmark_metrics, pass_at_k, problem_metrics, results_table


def brute(n, c, k):
    answers = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(answers[i] for i in s) for s in subsets) / len(subsets)


def test_against_enumeration_exhaustive_small():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute(n, c, k), abs=1e-12), (n, c, k)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_against_enumeration_random(nck):
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(brute(n, c, k), abs=1e-12)


def test_large_n_stable_and_matches_comb():
    n, c, k = 1000, 7, 64
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)


def test_invalid():
    for args in [(3, 4, 1), (3, 1, 0), (3, 1, 4), (3, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*args)


def test_aggregation_and_table():
    b1 = [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    m = problem_metrics(b1[0], ks=[1, 2, 8])
    assert m == {"avg@4": 0.25, "pass@1": pytest.approx(0.25), "pass@2": pytest.approx(0.5)}
    bm = benchmark_metrics(b1, ks=[1, 2])
    assert bm["pass@1"] == pytest.approx((0.25 + 1 + 0) / 3)
    assert bm["pass@2"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert bm["avg@4"] == pytest.approx(bm["pass@1"]) and bm["num_problems"] == 3
    assert avg_at_k([1, 0, 1, 1], k=2) == 0.5
    metrics, table = results_table({"arith": b1, "gsm8k": [[1, 0, 1, 0]]}, ks=[1, 2])
    assert metrics["gsm8k"]["pass@2"] == pytest.approx(1 - 1 / 6)
    lines = table.splitlines()
    assert lines[0].startswith("| benchmark | problems | avg@4 | pass@1 | pass@2")
    assert lines[2].startswith("| arith | 3 | 41.67 | 41.67 | 50.00")
    assert lines[-1].startswith("| average |")
    with pytest.raises(ValueError):
        benchmark_metrics([[1, 0], [1]])


def test_evaluate_with_stub_engine():
    from types import SimpleNamespace

    from megatron_dgpo.eval import evaluate
    from megatron_dgpo.reward import ExactMatchReward
    from megatron_dgpo.rollout import RolloutSample, SamplingParams

    class Stub:
        """Answers prompt p with str(p[0]) on even samples and "x" on odd ones."""

        def generate(self, prompts, sp):
            return [RolloutSample(i, p, [p[0]] if j % 2 == 0 else [-1], [0.0], "stop", "0")
                    for i, p in enumerate(prompts) for j in range(sp.n)]

    ds = SimpleNamespace(examples=[SimpleNamespace(prompt_ids=[k], ground_truth=str(k if k < 3 else 0))
                                   for k in range(5)])
    decode = lambda ids: "x" if ids == [-1] else str(ids[0])  # noqa: E731
    metrics, table, raw = evaluate(Stub(), {"toy": ds}, ExactMatchReward(), decode,
                                   SamplingParams(n=4), ks=[1, 2], prompts_per_call=2)
    assert raw["toy"] == [[1.0, 0.0, 1.0, 0.0]] * 3 + [[0.0] * 4] * 2
    assert metrics["toy"]["pass@1"] == pytest.approx(0.5 * 3 / 5)
    assert metrics["toy"]["pass@2"] == pytest.approx((1 - 1 / 6) * 3 / 5)
    assert "| toy | 5 |" in table
