"""Deterministic, resumable prompt batches.

The whole sampler state is one int (batches served so far): batch `s` is slice `s % per_epoch`
of permutation number `s // per_epoch`, each permutation seeded by (seed, epoch). Resuming from a
checkpoint therefore needs no saved RNG state and gives exactly the batches an unbroken run would.
"""
from __future__ import annotations

import numpy as np


class PromptSampler:
    def __init__(self, dataset, batch_size: int, seed: int = 0, shuffle: bool = True, state: int = 0):
        n = len(dataset)
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        if n < batch_size:
            raise ValueError(f"dataset has {n} prompts, fewer than one batch of {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.batches_per_epoch = n // batch_size  # the tail of each permutation is dropped
        self.state = int(state)
        self._perm_epoch = -1
        self._perm = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            n = len(self.dataset)
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(n)
                          if self.shuffle else np.arange(n))
            self._perm_epoch = epoch
        return self._perm

    @property
    def epoch(self) -> int:
        return self.state // self.batches_per_epoch

    def indices(self, state: int) -> list[int]:
        epoch, pos = divmod(state, self.batches_per_epoch)
        perm = self._permutation(epoch)
        return perm[pos * self.batch_size:(pos + 1) * self.batch_size].tolist()

    def next_indices(self) -> list[int]:
        idx = self.indices(self.state)
        self.state += 1
        return idx

    def next_batch(self) -> list:
        return [self.dataset[i] for i in self.next_indices()]

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> int:
        return self.state

    def load_state_dict(self, state: int) -> None:
        self.state = int(state)
