"""Evaluate a rollout engine on prompt datasets: n samples per problem, reward > 0.5 counts as
correct, then pass@k / avg@n per benchmark."""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

from .passk import results_table


def evaluate(engine, datasets: Mapping[str, object], reward_fn, decode: Callable[[list[int]], str],
             sampling, ks: Sequence[int] = (1,), prompts_per_call: int = 64
             ) -> tuple[dict[str, dict[str, float]], str, dict[str, list[list[float]]]]:
    """Return (metrics per benchmark, markdown table, raw per-problem rewards).

    `datasets` maps a benchmark name to a PromptDataset (examples with prompt_ids and
    ground_truth); `decode` turns response ids into text for the reward (e.g.
    `lambda ids: tok.decode(ids, skip_special_tokens=True)`); `sampling` is a SamplingParams whose
    `n` is the number of samples per problem.
    """
    raw: dict[str, list[list[float]]] = {}
    for name, ds in datasets.items():
        examples = list(ds.examples)
        per_problem: list[list[float]] = []
        for s in range(0, len(examples), prompts_per_call):
            chunk = examples[s:s + prompts_per_call]
            samples = engine.generate([e.prompt_ids for e in chunk], sampling)
            texts = [decode(x.response_ids) for x in samples]
            gts = [chunk[x.prompt_index].ground_truth for x in samples]
            rewards, _ = reward_fn.score(texts, gts)
            groups: list[list[float]] = [[] for _ in chunk]
            for x, r in zip(samples, rewards):
                groups[x.prompt_index].append(r)
            per_problem += groups
        raw[name] = per_problem
    metrics, table = results_table(raw, ks)
    return metrics, table, raw
