"""The generator: prefill a (left-padded) batch of prompts into a KV cache, then decode one token per
step for every row. `generate` returns completions, `stream` yields text deltas, beam search is
`num_beams > 1`. No autograd state is ever kept (inference_mode)."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch

from gptlab.errors import GptlabError
from gptlab.generate.cache import KVCache
from gptlab.generate.logits import NgramBlocker, apply_penalties, hold_stops, next_tokens
from gptlab.generate.packed import pack_linears
from gptlab.generate.params import SamplingParams
from gptlab.generate.spans import SpanGrammar
from gptlab.generate.text import TextStream
from gptlab.model import GPT
from gptlab.runtime import linear_shape, resolve_dtype
from gptlab.tokenizer import OmniTokenizer, Tokenizer


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end token or stop string) or "length"
    prompt_tokens: int


class Generator:
    def __init__(self, model: GPT, tokenizer: Tokenizer, dtype: torch.dtype | str | None = None, rows: int = 1):
        """dtype: None keeps the weights' dtype; a torch dtype or name converts the weights, which decoding
        reads once per token ('auto': bf16 where this device decodes `rows` rows a step faster in it)."""
        if dtype is not None:
            device = next(model.parameters()).device
            model = model.to(resolve_dtype(dtype, device, linear_shape(model, rows)))
        self.model, self.tok = model.eval(), tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        if self.device.type == "cpu":
            pack_linears(model)  # oneDNN-packed weights stream 1.6-7x faster in decoding matmuls
        self.ctx = model.cfg.block_size

    # --- prompts ---------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tok.encode(prompt)
        if isinstance(prompt, int):
            raise GptlabError("prompts must be a list of strings or of token-id lists, e.g. [[1, 2, 3]]")
        ids = [int(t) for t in prompt]
        if any(not 0 <= t < self.tok.vocab_size for t in ids):
            raise GptlabError(f"prompt token ids must be in 0..{self.tok.vocab_size - 1}")
        return ids

    def fit(self, ids: list[int], p: SamplingParams) -> tuple[list[int], SamplingParams]:
        """Keep prompt + new tokens within the context. A prompt that fits is kept whole and generation
        stops at the context's end (finish_reason "length"). A prompt that does not fit keeps its most
        recent tokens, leaving room for min(max_new_tokens, context/2) new ones, with a warning; in
        strict mode it is an error instead."""
        ids = ids or [self.tok.eot_id]  # an empty prompt starts a new document
        if len(ids) >= self.ctx:
            msg = f"prompt of {len(ids)} tokens does not fit the context window of {self.ctx} tokens"
            if p.strict:
                raise GptlabError(msg)
            keep = self.ctx - min(p.max_new_tokens, self.ctx // 2)
            warnings.warn(f"{msg}; keeping the last {keep} prompt tokens", stacklevel=3)
            ids = ids[-keep:]
        new = min(p.max_new_tokens, self.ctx - len(ids))
        return ids, dataclasses.replace(p, max_new_tokens=new) if new != p.max_new_tokens else p

    # --- public API ------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: list[str | list[int]] | str, params: SamplingParams = SamplingParams(),
                 num_samples: int = 1) -> list[Completion]:
        """Completions for each prompt (num_samples each, in order), decoded together in one batch."""
        prompts = [prompts] if isinstance(prompts, (str,)) else prompts
        # sample k of a prompt uses seed + k, so a row's text does not depend on what else is in the batch
        fitted = [self.fit(self.encode(pr), params) for pr in prompts for _ in range(num_samples)]
        if not fitted:
            return []
        ids, limits = [f[0] for f in fitted], [f[1].max_new_tokens for f in fitted]
        seeds = [None if params.seed is None else params.seed + k for _ in prompts for k in range(num_samples)]
        if params.num_beams > 1:
            if isinstance(self.tok, OmniTokenizer):
                raise GptlabError("beam search is not available for omni models (media spans are sampled or greedy)")
            return [self._beam_search(row, q) for row, (_, q) in zip(ids, fitted)]
        streams = [TextStream(self.tok, params.stop, params.include_stop_str) for _ in ids]
        tokens: list[list[int]] = [[] for _ in ids]
        reasons = ["length"] * len(ids)
        for step_tokens, done in self._decode(ids, params, streams, limits, seeds):
            for i, t in step_tokens:
                tokens[i].append(t)
            for i, why in done:
                reasons[i] = why
        for s in streams:
            s.finish()
        return [Completion(s.text, t, r, len(pr)) for s, t, r, pr in zip(streams, tokens, reasons, ids)]

    @torch.inference_mode()
    def stream(self, prompt: str | list[int], params: SamplingParams = SamplingParams()) -> Iterator[str]:
        """Text deltas of one completion as tokens arrive; concatenated they equal generate()'s text."""
        ids, p = self.fit(self.encode(prompt), params)
        if p.num_beams > 1:
            yield self._beam_search(ids, p).text
            return
        s = TextStream(self.tok, p.stop, p.include_stop_str)
        for _ in self._decode([ids], p, [s], [p.max_new_tokens], [p.seed]):
            d = s.delta()
            if d:
                yield d
        s.finish()
        d = s.delta(final=True)
        if d:
            yield d

    # --- sampling loop ---------------------------------------------------------------------------
    def _prefill(self, ids: list[list[int]], max_new: int) -> tuple[KVCache, torch.Tensor]:
        B, P = len(ids), max(len(r) for r in ids)
        pad = torch.tensor([P - len(r) for r in ids])
        x = torch.full((B, P), self.tok.eot_id, dtype=torch.long)
        for i, r in enumerate(ids):
            x[i, P - len(r):] = torch.tensor(r)
        cache = KVCache(self.model.cfg, B, P + max_new, self.device, self.dtype, pad)
        h = self.model.hidden(x.to(self.device), cache=cache)
        return cache, self._logits(h)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, V) fp32 logits of the last position, limited to the tokenizer's ids (a model may have
        more embedding rows, e.g. padded to a multiple of 64)."""
        return self.model.lm_head(h[:, -1]).float()[:, :self.tok.vocab_size]

    def _step(self, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        return self._logits(self.model.hidden(tokens[:, None], cache=cache))

    def _decode(self, ids: list[list[int]], p: SamplingParams, streams: list[TextStream], limits: list[int],
                seeds: list[int | None]):
        """Yields ([(row, token)], [(row, finish_reason)]) per step for rows still running. Row i stops
        after limits[i] tokens (its share of the context), an end token or a stop string."""
        B, steps = len(ids), max(limits)
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else {self.tok.eot_id})
        gens = [torch.Generator(device=self.device).manual_seed(sd) if sd is not None else None for sd in seeds]
        cache, logits = self._prefill(ids, steps)
        seen = None
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(B, logits.size(-1), dtype=torch.bool, device=self.device)
            for i, r in enumerate(ids):
                seen[i, r] = True
        ngrams = NgramBlocker(p.no_repeat_ngram_size, ids) if p.no_repeat_ngram_size else None
        spans = SpanGrammar(self.tok, ids, p.modalities) if isinstance(self.tok, OmniTokenizer) else None
        running = [True] * B
        for step in range(steps):
            logits = apply_penalties(logits, p, seen, ngrams.banned() if ngrams else None)
            logits = hold_stops(logits, stop_ids, step, p)
            if spans is not None:  # media spans: their codes only, images at their fixed length
                logits = spans.mask(logits)
            nxt = next_tokens(logits, p, gens)
            toks = nxt.tolist()
            emitted, done = [], []
            for i, t in enumerate(toks):
                if not running[i]:
                    continue
                if t in stop_ids:
                    running[i] = False
                    done.append((i, "stop"))
                    continue
                emitted.append((i, t))
                if streams[i].push(t):
                    running[i] = False
                    done.append((i, "stop"))
                elif step + 1 >= limits[i]:
                    running[i] = False
                    done.append((i, "length"))
            yield emitted, done
            if not any(running) or step == steps - 1:
                return
            if seen is not None:
                seen[torch.arange(B, device=self.device), nxt] = True
            if ngrams:
                ngrams.push(toks)
            if spans is not None:
                spans.push(toks)
            logits = self._step(cache, nxt)

    # --- beam search -----------------------------------------------------------------------------
    def _beam_search(self, ids: list[int], p: SamplingParams) -> Completion:
        """Beam search with a length penalty, as GPT-3 used for free-form answers (4 beams, α 0.6).
        Hypotheses score sum(log p) / len ** α. The search ends at max_new_tokens (running beams then
        compete as they are) or, as transformers' heuristic does, when K hypotheses have finished and
        the best running beam's current score does not beat them. Stop strings are applied to the
        chosen hypothesis afterwards."""
        K = p.num_beams
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else {self.tok.eot_id})
        cache, logits = self._prefill([ids], p.max_new_tokens)
        cache.reorder(torch.zeros(K, dtype=torch.long, device=self.device))
        logits = logits.expand(K, -1)
        beams: list[list[int]] = [[] for _ in range(K)]
        scores = torch.full((K,), float("-inf"), device=self.device)
        scores[0] = 0.0  # all beams start identical: expand only the first
        finished: list[tuple[float, list[int], str]] = []
        ngrams = NgramBlocker(p.no_repeat_ngram_size, [ids] * K) if p.no_repeat_ngram_size else None
        seen = torch.zeros(K, logits.size(-1), dtype=torch.bool, device=self.device) if p.repetition_penalty != 1.0 else None
        if seen is not None:
            seen[:, ids] = True
        for step in range(p.max_new_tokens):
            logits = hold_stops(apply_penalties(logits.clone(), p, seen, ngrams.banned() if ngrams else None),
                                stop_ids, step, p)
            cand = (scores[:, None] + torch.log_softmax(logits, -1)).view(-1)
            top_scores, top = torch.topk(cand, 2 * K)
            next_beams, next_scores, src, toks = [], [], [], []
            V = logits.size(-1)
            for sc, idx in zip(top_scores.tolist(), top.tolist()):
                b, t = divmod(idx, V)
                if sc == float("-inf"):
                    break
                if t in stop_ids:
                    finished.append((sc / max(1, len(beams[b]) + 1) ** p.length_penalty, beams[b], "stop"))
                    continue
                next_beams.append(beams[b] + [t])
                next_scores.append(sc)
                src.append(b)
                toks.append(t)
                if len(next_beams) == K:
                    break
            if not next_beams:  # every candidate ended
                beams = []
                break
            beams, scores = next_beams, torch.tensor(next_scores, device=self.device)
            best_running = max(next_scores) / (step + 1) ** p.length_penalty
            if len(finished) >= K and max(f[0] for f in finished) >= best_running:
                beams = []  # HF's stopping heuristic: no running beam is expected to catch up
                break
            index = torch.tensor(src, device=self.device)
            cache.reorder(index)
            if seen is not None:
                seen = seen.index_select(0, index)
                seen[torch.arange(len(toks)), toks] = True
            if ngrams:
                ngrams.reorder(src)
                ngrams.push(toks)
            if step == p.max_new_tokens - 1:
                break
            logits = self._step(cache, torch.tensor(toks, device=self.device))
        for b, sc in zip(beams, scores.tolist()):
            finished.append((sc / max(1, len(b)) ** p.length_penalty, b, "length"))
        if not finished:  # every continuation was banned (e.g. by no_repeat_ngram_size)
            return Completion("", [], "stop", len(ids))
        score, best, reason = max(finished, key=lambda f: f[0])
        s = TextStream(self.tok, p.stop, p.include_stop_str)
        for t in best:
            if s.push(t):
                reason = "stop"
                break
        s.finish()
        return Completion(s.text, best, reason, len(ids))
