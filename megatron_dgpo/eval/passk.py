"""pass@k and avg@k over n sampled answers per problem, and a per-benchmark table.

pass@k is the unbiased estimator of Chen et al. (2021): the probability that at least one of k
answers drawn without replacement from the n sampled ones is correct, 1 - C(n-c, k) / C(n, k).
Binomials overflow floats for realistic n, so it is computed as the product
1 - prod_{i=n-c+1}^{n} (1 - k / i).
"""
from __future__ import annotations

from typing import Mapping, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0  # every k-subset contains a correct answer
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def avg_at_k(correct: Sequence[float], k: int | None = None) -> float:
    """Mean correctness of the first k answers (all of them when k is None)."""
    xs = list(correct)[:k] if k is not None else list(correct)
    if not xs:
        raise ValueError("avg@k of no answers")
    return sum(float(x) for x in xs) / len(xs)


def problem_metrics(correct: Sequence[float], ks: Sequence[int]) -> dict[str, float]:
    """correct: one 0/1 (or reward > 0.5 counted as correct) entry per sampled answer."""
    n = len(correct)
    c = sum(1 for x in correct if float(x) > 0.5)
    out = {f"avg@{n}": avg_at_k(correct)}
    for k in ks:
        if k <= n:
            out[f"pass@{k}"] = pass_at_k(n, c, k)
    return out


def benchmark_metrics(per_problem: Sequence[Sequence[float]], ks: Sequence[int] = (1,)) -> dict[str, float]:
    """Mean over problems of each metric; problems must all have the same number of samples."""
    if not per_problem:
        raise ValueError("benchmark has no problems")
    ns = {len(p) for p in per_problem}
    if len(ns) != 1:
        raise ValueError(f"problems have different sample counts {sorted(ns)}")
    rows = [problem_metrics(p, ks) for p in per_problem]
    out = {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}
    out["num_problems"] = float(len(rows))
    return out


def results_table(results: Mapping[str, Sequence[Sequence[float]]], ks: Sequence[int] = (1,)
                  ) -> tuple[dict[str, dict[str, float]], str]:
    """({benchmark: metrics}, markdown table) with one row per benchmark and a macro average."""
    metrics = {name: benchmark_metrics(per_problem, ks) for name, per_problem in results.items()}
    cols = []
    for m in metrics.values():
        cols += [c for c in m if c != "num_problems" and c not in cols]
    lines = ["| benchmark | problems | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for name, m in metrics.items():
        cells = [f"{100 * m[c]:.2f}" if c in m else "-" for c in cols]
        lines.append(f"| {name} | {int(m['num_problems'])} | " + " | ".join(cells) + " |")
    if len(metrics) > 1:
        avg = [f"{100 * sum(m[c] for m in metrics.values()) / len(metrics):.2f}"
               if all(c in m for m in metrics.values()) else "-" for c in cols]
        lines.append("| average | - | " + " | ".join(avg) + " |")
    return metrics, "\n".join(lines)
