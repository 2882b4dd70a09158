"""In-context demonstrations (GPT-3): K examples drawn from the training split with a fixed seed, never the
example being evaluated, and K lowered for an example whose prompt would not fit the context window.

The draw is lm-evaluation-harness's default sampler, so the same seed picks the same demonstrations in
both evaluators: one `random.Random(seed)` per task, consumed in test-document order; from the test split
itself it draws K + 1 and drops the example. An identical copy of the example is never a demonstration."""

from __future__ import annotations

import random
from typing import Callable, Sequence

from gptlab.errors import GptlabError


class DemoSampler:
    def __init__(self, pool: Sequence[dict], seed: int, same_split: bool):
        self.pool, self.same_split = list(pool), same_split
        self.rnd = random.Random(seed)

    def sample(self, k: int, doc: dict) -> list[dict]:
        """k demonstrations for `doc`, in the order drawn."""
        if k < 0:
            raise GptlabError(f"the number of shots must be ≥ 0, got {k}")
        if k == 0:
            return []
        others = len(self.pool) - int(self.same_split)
        if others < k:
            raise GptlabError(f"{k} shots requested but the demonstration pool has only {others} other examples")
        # from another split: k draws; from the test split: k + 1 draws, minus the example (lm-eval's way).
        # Either way an identical copy of the example is never shown (its answer would leak).
        key = _content(doc)  # compare content: rows carry their file line (`_line`), copies do not share it
        res = [x for x in self.rnd.sample(self.pool, k + int(self.same_split)) if _content(x) != key][:k]
        if len(res) < k:  # the pool holds copies of doc: draw again from the pool without any of them
            rest = [x for x in self.pool if _content(x) != key]
            if len(rest) < k:
                raise GptlabError(f"{k} shots requested but the pool has only {len(rest)} examples unlike this one")
            res = self.rnd.sample(rest, k)
        return res


def _content(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "_line"}


def fit_shots(n_tokens: Callable[[int], int], k: int, budget: int) -> int:
    """The largest k' ≤ k whose prompt (with k' demonstrations) is at most `budget` tokens, found by
    dropping the last demonstration until it fits; 0 when even the bare prompt is too long (the
    scorer then keeps its most recent tokens)."""
    while k > 0 and n_tokens(k) > budget:
        k -= 1
    return k
