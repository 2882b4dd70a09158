"""Seeded data order for the stages: epochs of examples, held-out splits, evaluation subsets, and the
weight of a micro-batch in its step. Everything is a pure function of (seed, step) and never touches the
global RNG, as the engine's bit-exact resume requires."""

from __future__ import annotations

from typing import Callable

import torch

from gptlab.errors import GptlabError


class EpochOrder:
    """Sample i of step s's global batch (n per step) is example perm_e[p % N] with p = s·n + i and
    e = p // N; perm_e is a permutation seeded by (seed, e) on its own generator (the global RNG is
    never touched). With `lengths` and `group` > 1, each run of `group` positions of perm_e is sorted by
    length, longest first (as transformers' group_by_length): neighbouring examples, hence a batch, have
    similar lengths and pad little, while which examples share a run stays random."""

    def __init__(self, n: int, seed: int, lengths: list[int] | None = None, group: int = 0):
        self.n, self.seed, self._perms = n, seed, {}
        self.lengths, self.group = lengths, group if lengths is not None else 0

    def perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (1 << 62))
            perm = torch.randperm(self.n, generator=g).tolist()
            if self.group > 1:
                perm = [i for k in range(0, self.n, self.group)
                        for i in sorted(perm[k:k + self.group], key=lambda i: -self.lengths[i])]
            self._perms[epoch] = perm
        return self._perms[epoch]

    def indices(self, step: int, sample_slice: slice, n_global: int) -> list[int]:
        out = []
        for i in range(sample_slice.start, sample_slice.stop):
            p = step * n_global + i
            out.append(self.perm(p // self.n)[p % self.n])
        return out

    def micro_weight(self, step: int, sample_slice: slice, n_global: int, tokens: Callable[[int], int]) -> float:
        """The weight of a micro-batch's mean loss so that the engine's average over micro-steps and processes
        is the mean over all of the step's tokens (tokens(i): example i's target tokens), however the step
        is split. Sequences vary in length, so a plain average of micro-batch means would not be."""
        idx = self.indices(step, sample_slice, n_global)
        step_tokens = sum(tokens(i) for i in self.indices(step, slice(0, n_global), n_global))
        return sum(tokens(i) for i in idx) * (n_global // len(idx)) / max(step_tokens, 1)


def split_heldout(n: int, fraction: float, seed: int, min_heldout: int = 1) -> tuple[list[int], list[int]]:
    """Seeded random split of range(n) -> (train indices, held-out indices). fraction 0 -> no held-out set."""
    if not (0 <= fraction < 1):
        raise GptlabError(f"held-out fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return list(range(n)), []
    k = max(min_heldout, round(n * fraction))
    if n - k < 1:
        raise GptlabError(f"{n} examples are too few to hold out {fraction:.0%} and still train")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[k:]), sorted(perm[:k])


def eval_subsets(seed: int, *sizes: tuple[int, int]) -> list[list[int]]:
    """For each (n, k): k of range(n), drawn in turn from one generator seeded by `seed` — the fixed subsets
    the periodic evaluations score (the final one scores everything)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g)[:k].tolist() for n, k in sizes]
