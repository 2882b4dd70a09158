"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) inside the continuous-batching engine.

A smaller run with the same tokenizer drafts k tokens per row, one cheap step each; the served model then
scores all of them in one forward pass over k+1 slots. Draft j is kept with probability
min(1, p_j(d_j) / q_j(d_j)) (p: the target's distribution, q: the draft's, both after the row's
temperature and top-k/top-p/min-p); at the first rejection the next token is drawn from norm(max(0, p_j - q_j)),
which makes every emitted token distributed exactly as plain sampling from p. Greedy rows keep a draft when
it is the target's argmax, so their output is the plain greedy output.

The draft keeps its own KV cache in lockstep with the target's: same rows, same slots (it is prefilled on
the same prompts and fed the same tokens: k per round, plus the k-th draft when some row kept all k), so
row surgery and the rewind of rejected slots apply to both alike. Rows whose sampling depends on what came before (penalties, logit bias, grammars,
omni spans, logprobs, min_tokens) take no drafts: they accept 0 and advance one token per round.
"""

from __future__ import annotations

import torch

from gptlab.generate.cache import KVCache
from gptlab.generate.generator import Generator
from gptlab.generate.logits import filter_logits


def accept_drafts(p: torch.Tensor, q: torch.Tensor, drafts: list[int],
                  gen: torch.Generator | None) -> tuple[int, torch.Tensor | None]:
    """A sampled row: p (k+1, V) target probabilities after each fed token, q (k, V) the draft's for
    d_1..d_k -> (drafts accepted, the distribution to draw the next token from after a rejection, or None:
    draw it from p at the accepted position as usual). Greedy rows keep the drafts that equal the argmax."""
    for j, d in enumerate(drafts):
        u = torch.rand((), generator=gen, device=p.device)
        if u * q[j, d] >= p[j, d]:  # rejected: u >= p/q, written without dividing by q
            residual = (p[j] - q[j]).clamp_min(0)
            total = residual.sum()
            return j, residual / total if total > 0 else p[j]
    return len(drafts), None


def probs(logits: torch.Tensor, params) -> torch.Tensor:
    """(N, V) logits -> the distribution a sampled row draws from (temperature, top-k/top-p/min-p)."""
    return torch.softmax(filter_logits(logits, params), dim=-1)


class Speculator:
    def __init__(self, draft: Generator, k: int = 4):
        self.draft, self.k = draft, k
        self.cache: KVCache | None = None
        self.proposed = self.accepted = 0

    # --- lockstep row surgery ----------------------------------------------------------------------
    def prefill(self, x: torch.Tensor, pad: torch.Tensor, max_len: int) -> KVCache:
        """The draft's cache for newcomer prompts x (B, P), left-padded like the target's."""
        cache = KVCache(self.draft.model.cfg, x.size(0), max_len, self.draft.device, self.draft.dtype, pad, ring=False)
        self.draft.model.hidden(x.to(self.draft.device), cache=cache)
        return cache

    def reset(self, cache: KVCache | None) -> None:
        self.cache = cache

    def merge(self, cache: KVCache, room: int) -> None:
        self.cache = KVCache.concat([self.cache, cache], room)

    def keep_rows(self, idx: torch.Tensor) -> None:
        self.cache.keep_rows(idx.to(self.draft.device))

    def grow(self, room: int) -> None:
        self.cache = KVCache.concat([self.cache], room)

    # --- one round -------------------------------------------------------------------------------
    def propose(self, feed: torch.Tensor, rows: list) -> tuple[torch.Tensor, torch.Tensor | None]:
        """feed (B,) each row's newest token -> drafts (B, k) and q (B, k, V) for the rows that sample
        (None if all are greedy). Feeds the draft feed, d_1 .. d_{k-1}."""
        drafts, qs = [], []
        x = feed.to(self.draft.device)
        sampled = [i for i, r in enumerate(rows) if r is not None and r.params.temperature > 0]
        for _ in range(self.k):
            logits = self.draft._step(self.cache, x)  # (B, V)
            d = logits.argmax(-1)
            if sampled:
                q = torch.zeros_like(logits)
                for i in sampled:
                    q[i] = probs(logits[i:i + 1], rows[i].params)[0]
                    d[i] = torch.multinomial(q[i], 1, generator=rows[i].gen)[0]
                qs.append(q)
            drafts.append(d)
            x = d
        return torch.stack(drafts, 1).cpu(), torch.stack(qs, 1) if qs else None

    def catch_up(self, last: torch.Tensor) -> None:
        """Feed `last` (B,) alone: d_k when some row kept every draft, so the draft's cache holds the same k+1
        slots as the target's; or the round's token when no row drafts and the target takes a plain step."""
        self.draft.model.hidden(last.to(self.draft.device)[:, None], cache=self.cache)
