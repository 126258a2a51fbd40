"""Built-in verifiable task: multi-digit integer arithmetic, e.g. prompt "12+345=" -> answer "357".

Train and held-out problems are disjoint and fixed by the seed, so a tiny model can be trained
end to end with an exact-match reward and evaluated on problems it never saw.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass
class ArithmeticConfig:
    min_digits: int = 1
    max_digits: int = 3
    operators: list[str] = field(default_factory=lambda: ["+", "-"])
    num_train: int = 5000
    num_eval: int = 500
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError("ArithmeticConfig needs 1 <= min_digits <= max_digits")
        bad = [o for o in self.operators if o not in _OPS]
        if bad or not self.operators:
            raise ValueError(f"ArithmeticConfig.operators: {bad or 'empty'}; supported {sorted(_OPS)}")
        if self.num_train < 0 or self.num_eval < 0:
            raise ValueError("ArithmeticConfig: num_train/num_eval must be >= 0")


def solve(a: int, op: str, b: int) -> str:
    return str(_OPS[op](a, b))


def problem_space_size(cfg: ArithmeticConfig) -> int:
    operands = 10 ** cfg.max_digits - (10 ** (cfg.min_digits - 1) if cfg.min_digits > 1 else 0)
    return len(set(cfg.operators)) * operands * operands


def _operand(rng: random.Random, cfg: ArithmeticConfig) -> int:
    d = rng.randint(cfg.min_digits, cfg.max_digits)
    lo = 0 if d == 1 else 10 ** (d - 1)
    return rng.randint(lo, 10 ** d - 1)


def make_splits(cfg: ArithmeticConfig) -> tuple[list[dict], list[dict]]:
    """(train, held_out) lists of {"prompt": "12+345=", "answer": "357"}; disjoint, seed-determined."""
    need = cfg.num_train + cfg.num_eval
    space = problem_space_size(cfg)
    if need > space // 2:
        # Rejection sampling of unique problems gets slow and the split meaningless near the limit.
        raise ValueError(f"ArithmeticConfig asks for {need} unique problems out of only {space}; "
                         "use more digits or fewer examples")
    rng = random.Random(cfg.seed)
    ops = sorted(set(cfg.operators))
    seen: set[tuple[int, str, int]] = set()
    problems = []
    while len(problems) < need:
        key = (_operand(rng, cfg), rng.choice(ops), _operand(rng, cfg))
        if key in seen:
            continue
        seen.add(key)
        a, op, b = key
        problems.append({"prompt": f"{a}{op}{b}=", "answer": solve(a, op, b)})
    # Held-out first so its contents do not change when num_train grows.
    return problems[cfg.num_eval:], problems[:cfg.num_eval]
