"""Scoring continuations: log p(continuation | context) summed over its tokens, whether every token is the
greedy (argmax) choice, and how many tokens were scored. One function serves multiple choice, last-word
prediction, rolling perplexity and the lm-eval adapter.

Conventions are lm-evaluation-harness's, so both evaluators score the same tokens:
- text pairs are encoded as lm-eval's causal models do (`encode_pair`): trailing whitespace of the context
  moves to the continuation, the pair is encoded whole and split at the context's length; an empty
  context becomes the end-of-text token (the document start);
- a pair longer than the window keeps its last block_size + 1 tokens (the context is left-truncated) and
  the model reads all but the last of them;
- log-probabilities are fp32 log-softmax over the tokenizer's ids (a model may have padded extra rows).

Two execution paths, equal up to float rounding: pairs that share a context (the choices of one question)
prefill that context once into a KV cache, expand it to one row per continuation and run only the
continuations; everything else (single pairs, pairs that must be truncated, rolling windows) runs as
right-padded batches of full sequences, sorted by length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from gptlab.errors import GptlabError
from gptlab.model.loss import token_logprobs

Pair = tuple[Sequence[int], Sequence[int]]
_LOGIT_CHUNK = 1024


@dataclass(frozen=True)
class Score:
    logprob: float  # sum of log p(token | everything before it) over the continuation, in nats
    greedy: bool  # every continuation token is the argmax given its prefix (teacher forcing)
    n_tokens: int  # continuation tokens scored


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as lm-eval's causal LMs encode a (context, continuation)."""
    if context == "":
        return [tokenizer.eot_id], tokenizer.encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:  # "Answer: " + "B" -> "Answer:" + " B": the space belongs to the answer's first token
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    if not ctx:  # an all-whitespace context: condition on the document start instead
        return [tokenizer.eot_id], tokenizer.encode(continuation)
    return ctx, whole[len(ctx):]


def _device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _score_rows(model, h: torch.Tensor, targets: torch.Tensor, lengths: list[int], vocab: int) -> list[Score]:
    """h: (N, C) hidden states that predict `targets` (N,); rows are consecutive runs of `lengths`. The
    (positions, vocab) logits are made _LOGIT_CHUNK positions at a time (GPT-2: 200 MB, not N × 201 KB)."""
    lps, hits = [], []
    for j in range(0, h.size(0), _LOGIT_CHUNK):
        logits = model.lm_head(h[j:j + _LOGIT_CHUNK]).float()[:, :vocab]
        tgt = targets[j:j + _LOGIT_CHUNK]
        lps.append(token_logprobs(logits, tgt).double().cpu())
        hits.append((logits.argmax(dim=-1) == tgt).cpu())
    out, i = [], 0
    lp, hit = torch.cat(lps), torch.cat(hits)
    for n in lengths:
        out.append(Score(float(lp[i:i + n].sum()), bool(hit[i:i + n].all()), n))
        i += n
    return out


def _full_batches(model, items: list[tuple[int, list[int], int]], batch_size: int, vocab: int,
                  results: list, tick: Callable[[int], None]) -> None:
    """items: (index, input ids, n scored) — the last n inputs predict the n continuation tokens."""
    device, _ = _device_dtype(model)
    items = sorted(items, key=lambda it: -len(it[1]))
    for b in range(0, len(items), batch_size):
        chunk = items[b:b + batch_size]
        x = torch.zeros(len(chunk), len(chunk[0][1]) - 1, dtype=torch.long)  # the longest input first
        rows, cols, tgts, lens = [], [], [], []
        for r, (_, seq, n) in enumerate(chunk):
            x[r, :len(seq) - 1] = torch.tensor(seq[:-1])
            k = len(seq) - 1  # input length; positions k-n .. k-1 predict seq[k-n+1 .. k]
            rows += [r] * n
            cols += range(k - n, k)
            tgts += seq[k - n + 1:]
            lens.append(n)
        h = model.hidden(x.to(device))
        sel = h[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
        for (i, _, _), s in zip(chunk, _score_rows(model, sel, torch.tensor(tgts, device=device), lens, vocab)):
            results[i] = s
        tick(len(chunk))


def _shared_batches(model, groups: list[tuple[list[int], list[int]]], conts: dict[int, list[int]], batch_size: int,
                    vocab: int, results: list, tick: Callable[[int], None]) -> None:
    """groups: (context ids, [pair index, ...]), each context + its longest continuation within the window.
    Contexts are left-padded into one KV-cache prefill, the cache is expanded to one row per continuation
    and the continuations (right-padded) run on top of it."""
    from gptlab.generate.cache import KVCache

    device, dtype = _device_dtype(model)
    groups = sorted(groups, key=lambda g: -len(g[0]))
    b = 0
    while b < len(groups):
        batch, rows = [], 0
        while b < len(groups) and (not batch or rows + len(groups[b][1]) <= batch_size):
            batch.append(groups[b])
            rows += len(groups[b][1])
            b += 1
        G, P = len(batch), max(len(c) for c, _ in batch)
        members = [(g, i) for g, (_, idx) in enumerate(batch) for i in idx]
        Lc = max(len(conts[i]) for _, i in members)
        pad = torch.tensor([P - len(c) for c, _ in batch])
        x = torch.zeros(G, P, dtype=torch.long)
        for g, (c, _) in enumerate(batch):
            x[g, P - len(c):] = torch.tensor(c)
        cache = KVCache(model.cfg, G, P + Lc - 1, device, dtype, pad)
        h_ctx = model.hidden(x.to(device), cache=cache)[:, -1]  # (G, C): predicts each continuation's first token
        owner = torch.tensor([g for g, _ in members], device=device)
        h = h_ctx[owner][:, None]  # (R, 1, C)
        if Lc > 1:
            cache.reorder(owner)
            y = torch.zeros(len(members), Lc - 1, dtype=torch.long)
            for r, (_, i) in enumerate(members):
                y[r, :len(conts[i]) - 1] = torch.tensor(conts[i][:-1])
            h = torch.cat([h, model.hidden(y.to(device), cache=cache)], dim=1)  # (R, Lc, C)
        rows_i = [r for r, (_, i) in enumerate(members) for _ in conts[i]]
        cols_i = [j for _, i in members for j in range(len(conts[i]))]
        tgts = [t for _, i in members for t in conts[i]]
        sel = h[torch.tensor(rows_i, device=device), torch.tensor(cols_i, device=device)]
        scores = _score_rows(model, sel, torch.tensor(tgts, device=device), [len(conts[i]) for _, i in members], vocab)
        for (_, i), s in zip(members, scores):
            results[i] = s
        tick(len(members))


def score_pairs(model, pairs: Sequence[Pair], batch_size: int = 16, vocab_size: int | None = None,
                share_prefix: bool = True, progress: Callable[[int], None] | None = None) -> list[Score]:
    """Score each (context ids, continuation ids) pair with `model` (a gptlab GPT). A context must hold at
    least one token (use `encode_pair`, which conditions an empty context on the end-of-text token);
    an empty continuation scores 0. `batch_size` bounds the rows of one forward pass; `progress` is called
    with the number of pairs finished. The model runs in eval mode under inference_mode."""
    T = model.cfg.block_size
    vocab = vocab_size or model.cfg.vocab_size
    if batch_size < 1:
        raise GptlabError(f"batch size must be ≥ 1, got {batch_size}")
    results: list[Score | None] = [None] * len(pairs)
    groups: dict[tuple, list[int]] = {}
    full: list[tuple[int, list[int], int]] = []
    conts: dict[int, list[int]] = {}
    first: dict[tuple, int] = {}  # identical pairs (e.g. unconditional choice scores) are scored once
    copies: list[tuple[int, int]] = []
    tick = progress or (lambda n: None)
    for i, (ctx, cont) in enumerate(pairs):
        ctx, cont = [int(t) for t in ctx], [int(t) for t in cont]
        key = (tuple(ctx), tuple(cont))
        if key in first:
            copies.append((i, first[key]))
            continue
        first[key] = i
        if not ctx:
            raise GptlabError("a scoring context needs at least one token (condition on the end-of-text token)")
        if any(not 0 <= t < vocab for t in ctx + cont):
            raise GptlabError(f"token ids must be in 0..{vocab - 1}")
        if not cont:
            results[i] = Score(0.0, True, 0)
            continue
        if len(cont) > T:
            raise GptlabError(f"a continuation of {len(cont)} tokens does not fit the context window of {T} tokens")
        # strict: a shared-prefix row whose last query sat at position T-1 could attend to the clamped
        # positions of another row's padding in the same batch
        if share_prefix and len(ctx) + len(cont) <= T:
            groups.setdefault(tuple(ctx), []).append(i)
            conts[i] = cont
        else:
            full.append((i, (ctx + cont)[-(T + 1):], len(cont)))
    shared = []
    for ctx, idx in groups.items():
        if len(idx) > 1:  # many continuations of one context: prefill it once per batch_size of them
            shared += [(list(ctx), idx[j:j + batch_size]) for j in range(0, len(idx), batch_size)]
        else:
            full.append((idx[0], (list(ctx) + conts[idx[0]])[-(T + 1):], len(conts[idx[0]])))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if shared:
                _shared_batches(model, shared, conts, batch_size, vocab, results, tick)
            if full:
                _full_batches(model, full, batch_size, vocab, results, tick)
    finally:
        model.train(was_training)
    for i, j in copies:
        results[i] = results[j]
    tick(len(copies))
    return results  # type: ignore[return-value]


# --- rolling log-likelihood (perplexity) ----------------------------------------------------------
def rolling_pairs(tokens: Sequence[int], prefix: int, block_size: int, stride: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows over `prefix + tokens` that predict every token exactly once.

    The first window predicts the first min(block_size, N) tokens from the document start; each next
    window predicts the following `stride` tokens with the window filled up to block_size tokens of
    input, so every later token sees at least block_size - stride tokens of context (stride 1: as much
    as fits; stride = block_size: lm-eval's disjoint windows, the default of its loglikelihood_rolling).
    The last window always has a full context. Each pair fits the window without truncation."""
    T, N = block_size, len(tokens)
    stride = stride or T
    if not 1 <= stride <= T:
        raise GptlabError(f"stride must be in 1..{T} (the context window), got {stride}")
    seq = [int(prefix)] + [int(t) for t in tokens]  # seq[j] for j >= 1 are the targets
    out, done = [], 0
    while done < N:
        end = min(T if done == 0 else done + stride, N)  # predict targets seq[done+1 .. end]
        begin = max(0, end - T)  # model input seq[begin:end]
        out.append((seq[begin:done + 1], seq[done + 1:end + 1]))
        done = end
    return out


def loglikelihood_rolling(model, tokens: Sequence[int], prefix: int, stride: int | None = None, batch_size: int = 16,
                          vocab_size: int | None = None, progress: Callable[[int], None] | None = None) -> Score:
    """log p(tokens | document start), every token predicted once (see `rolling_pairs`)."""
    pairs = rolling_pairs(tokens, prefix, model.cfg.block_size, stride)
    scores = score_pairs(model, pairs, batch_size, vocab_size, share_prefix=False, progress=progress)
    return Score(sum(s.logprob for s in scores), all(s.greedy for s in scores), sum(s.n_tokens for s in scores))
