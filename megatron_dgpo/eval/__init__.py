"""Evaluation metrics: unbiased pass@k, avg@k and per-benchmark tables (values in [0, 1])."""
from .passk import avg_at_k, benchmark_metrics, pass_at_k, problem_metrics, results_table
from .runner import evaluate

__all__ = ["pass_at_k", "avg_at_k", "problem_metrics", "benchmark_metrics", "results_table", "evaluate"]
