"""Continuous batching over the KV-cache generator.

One engine thread owns the model. Each iteration it
  1. admits waiting requests (FIFO, while their choices fit in `max_batch` rows and a prefill token
     budget): their prompts are prefilled together in a left-padded batch and the resulting cache is
     merged into the running one (KVCache.concat right-aligns both by extra left padding);
  2. samples one token for every running row from the logits it holds (per-row params and RNGs);
  3. hands text deltas to each request's asyncio queue (loop.call_soon_threadsafe);
  4. retires finished and cancelled rows (lazily: the cache is compacted once a quarter of its rows
     are dead, or before a merge, since every compaction copies it), then runs one decode step
     for the rest.
A row's tokens depend only on its own prompt, params and seed, never on its neighbours: padding slots
are masked out and every row samples from its own torch.Generator.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import torch

from gptlab.generate.cache import KVCache
from gptlab.generate.constrain import Constraint, stop_tokens
from gptlab.generate.generator import Generator
from gptlab.generate.spans import SpanGrammar, SpanReader
from gptlab.generate.text import TextStream
from gptlab.serve.metrics import Metrics
from gptlab.serve.moderation import Moderator
from gptlab.serve.prefix import PrefixCache
from gptlab.serve.protocol import APIError, GenSpec
from gptlab.serve.sampling import RowSampler, prompt_logprobs, sample_rows
from gptlab.serve.speculative import Speculator, accept_drafts, probs
from gptlab.tokenizer import OmniTokenizer

log = logging.getLogger("gptlab.serve")
DONE = object()  # queue item after a request's last delta


@dataclass
class Delta:
    """New output of one choice in one decode step."""
    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # per token: (id, logprob, [(id, logprob)] top-k, text offset)
    finish_reason: str | None = None
    withhold: bool = False  # moderation flagged the whole choice: a non-streamed response drops its text
    media: list = field(default_factory=list)  # an omni reply's parts: audio chunks, images (SpanReader events)


class Request:
    def __init__(self, spec: GenSpec, loop: asyncio.AbstractEventLoop):
        self.spec, self.loop = spec, loop
        self.id = uuid.uuid4().hex[:24]
        self.arrival = time.perf_counter()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = self.finished = False
        self.first_token_at: float | None = None
        self.prompt_tokens = sum(len(p) for p in spec.prompts)
        self.completion_tokens = 0
        self.rows_left = len(spec.prompts) * spec.n
        self.prompt_logprobs: list[list] = []  # echo + logprobs: per prompt, its tokens' entries (the first's None)

    def post(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class Row:
    """One choice of a request: a row of the decode batch."""

    def __init__(self, req: Request, index: int, prompt: list[int], tok, device, moderator):
        spec, p = req.spec, req.spec.params
        seed = (p.seed + index % spec.n) % 2 ** 63 if p.seed is not None else secrets.randbits(63)
        self.req, self.index, self.prompt, self.adapter = req, index, prompt, spec.adapter
        eot = tok.eot_id
        omni = isinstance(tok, OmniTokenizer)
        self.stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else {eot})
        constraint = Constraint(tok, spec.grammar) if spec.grammar else None
        if constraint is not None:  # the grammar's own end: <|endoftext|> or <|end|>
            self.stop_ids |= set(stop_tokens(tok))
        self.sampler = RowSampler(p, torch.Generator(device=device).manual_seed(seed), prompt, tok.vocab_size,
                                  spec.logit_bias, spec.presence_penalty, spec.frequency_penalty, spec.logprobs,
                                  SpanGrammar(tok, [prompt], p.modalities) if omni else None, frozenset(self.stop_ids),
                                  constraint)
        self.media = SpanReader(tok, chunk=10) if omni else None  # speech streams in 0.2 s pieces
        self.stream = TextStream(tok, p.stop, p.include_stop_str)
        self.filter = moderator.output_filter() if moderator else None
        self.generated, self.alive, self.last = 0, True, eot
        self.out: list[int] = []  # sampled ids: with the prompt, what the row's KV holds (but the last)


class Engine:
    def __init__(self, generator: Generator, metrics: Metrics, max_batch: int = 32, max_queue: int = 64,
                 moderator: Moderator | None = None, prefill_tokens: int = 4096, prefix: PrefixCache | None = None,
                 spec: Speculator | None = None, adapters=None):
        self.gen, self.metrics, self.moderator, self.prefix, self.spec = generator, metrics, moderator, prefix, spec
        self.adapters = adapters  # gptlab.serve.adapters.AdapterBank: each row's LoRA adapter, or None
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch, max_queue, prefill_tokens
        self.tok, self.eot, self.vocab = generator.tok, generator.tok.eot_id, generator.tok.vocab_size
        self.cv = threading.Condition()
        self.waiting: deque[Request] = deque()
        self.rows: list[Row] = []
        self.cache: KVCache | None = None
        self.logits: torch.Tensor | None = None  # (B, V): next-token logits of every row
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="gptlab-engine", daemon=True)

    # --- called from the event loop ------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join(timeout=10)

    def submit(self, spec: GenSpec, loop: asyncio.AbstractEventLoop) -> Request:
        req = Request(spec, loop)
        with self.cv:
            if len(self.waiting) >= self.max_queue:
                self.metrics.count_rejected()
                raise APIError(503, f"server is busy: {len(self.waiting)} requests are already waiting; retry later",
                               code="server_overloaded", headers={"Retry-After": "1"})
            self.waiting.append(req)
            self._publish_load()
            self.cv.notify()
        return req

    def cancel(self, req: Request) -> None:
        """The client left: its rows stop at the next step (a waiting request is dropped on admission)."""
        if req.finished or req.cancelled:
            return
        with self.cv:
            req.cancelled = True
            if req in self.waiting:  # never admitted: free its queue slot now
                self.waiting.remove(req)
                req.finished = True
                self.metrics.count_cancelled()
                self._publish_load()
            self.cv.notify()

    # --- engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cv:
                    while not self.stopping and not self.waiting and not self.rows:
                        self.cv.wait()
                    if self.stopping:
                        return
                    newcomers = self._take_waiting()
                try:
                    if newcomers:
                        self._admit(newcomers)
                    if self.rows:
                        self._iterate()
                except Exception as e:  # a failure ends the requests in flight, never the server
                    log.exception("engine step failed")
                    err = APIError(500, f"generation failed: {type(e).__name__}: {e}")
                    for req in list({id(r.req): r.req for r in self.rows}.values()) + newcomers:
                        if not req.finished:
                            req.finished = True
                            req.post(err)
                    self._clear()
                with self.cv:
                    self._publish_load()

    def _take_waiting(self) -> list[Request]:
        """Pop the requests that fit now (FIFO; called with the lock held)."""
        taken, rows, tokens = [], sum(r.alive for r in self.rows), 0
        while self.waiting:
            req = self.waiting[0]
            if req.cancelled:
                self.waiting.popleft()
                self.metrics.count_cancelled()
                continue
            k = len(req.spec.prompts) * req.spec.n
            cost = sum(len(p) for p in req.spec.prompts)
            if rows + k > self.max_batch or (taken and tokens + cost > self.prefill_tokens):
                break
            taken.append(self.waiting.popleft())
            rows, tokens = rows + k, tokens + cost
        return taken

    def _publish_load(self) -> None:
        alive = [r for r in self.rows if r.alive]
        self.metrics.set_load(len({id(r.req) for r in alive}), len(self.waiting), len(alive))

    def _admit(self, reqs: list[Request]) -> None:
        """Prefill the newcomers' prompts (each distinct prompt once, after the longest cached prefix of
        each) and merge them into the batch."""
        new_rows = [Row(q, j * q.spec.n + k, p, self.tok, self.gen.device, self.moderator)
                    for q in reqs for j, p in enumerate(q.spec.prompts) for k in range(q.spec.n)]
        unique: dict[tuple, int] = {}  # (adapter, prompt): the same prompt under two adapters is two rows
        for r in new_rows:
            unique.setdefault((r.adapter, *r.prompt), len(unique))
        prompts = [list(p[1:]) for p in unique]
        adapter_of = [p[0] for p in unique]
        echo = {tuple(p) for q in reqs if q.spec.echo and q.spec.logprobs is not None for p in q.spec.prompts}
        hits = [self.prefix.lookup(p, a) if self.prefix is not None and tuple(p) not in echo else (0, [])
                for p, a in zip(prompts, adapter_of)]  # an echoed prompt needs every token's logits: no reuse
        B, P = len(prompts), max(len(p) for p in prompts)
        S = max(len(p) - c for p, (c, _) in zip(prompts, hits))  # slots to prefill: the longest uncached tail
        room = max(r.req.spec.params.max_new_tokens for r in new_rows)
        x = torch.full((B, S), self.eot, dtype=torch.long)
        for i, p in enumerate(prompts):
            tail = p[-S:]
            x[i, S - len(tail):] = torch.tensor(tail)
        pad = torch.tensor([P - len(p) for p in prompts])
        cache = KVCache(self.gen.model.cfg, B, P + room, self.gen.device, self.gen.dtype, pad, ring=False)
        for i, (c, blocks) in enumerate(hits):
            if c:  # copied in; a row whose tail is shorter than S recomputes some cached slots (same values)
                cache.write_row(i, int(pad[i]), torch.cat([b.kv for b in blocks], dim=3))
        cache.length = P - S
        self._route(adapter_of)
        h = self.gen.model.hidden(x.to(self.gen.device), cache=cache)  # (B, S, C)
        logits = self.gen._logits(h)  # (B, V)
        if self.prefix is not None:
            for i, p in enumerate(prompts):
                self.prefix.insert(p, lambda a, b, i=i: cache.read_row(i, a, b), adapter_of[i])
        self.metrics.add_cached_tokens(sum(c for c, _ in hits))
        for q in reqs:  # lm-eval's scoring call: the prompt's own logprobs, from the same forward pass
            if q.spec.echo and q.spec.logprobs is not None:
                q.prompt_logprobs = [prompt_logprobs(h[unique[(q.spec.adapter, *p)], S - len(p):], p, q.spec.logprobs,
                                                     self.tok, self.gen._logits)
                                     for p in q.spec.prompts]
        self.metrics.add_prompt_tokens(sum(len(p) - c for p, (c, _) in zip(prompts, hits)))
        drafted = None
        if self.spec is not None:  # the draft model's cache, slot for slot like the target's
            full = torch.full((B, P), self.eot, dtype=torch.long)
            for i, p in enumerate(prompts):
                full[i, P - len(p):] = torch.tensor(p)
            drafted = self.spec.prefill(full, pad, P + room)
        expand = torch.tensor([unique[(r.adapter, *r.prompt)] for r in new_rows], device=self.gen.device)
        if B != len(new_rows):  # n > 1 or repeated prompts: copy the prefilled rows
            for c in (cache, drafted) if drafted is not None else (cache,):
                c.reorder(expand.to(c.device))
                c.batch = len(new_rows)
            logits = logits.index_select(0, expand)
        if self.cache is not None:
            self._compact(force=True)
        if self.cache is None:
            self.cache, self.logits, self.rows = cache, logits, new_rows
            if self.spec is not None:
                self.spec.reset(drafted)
            return
        need = max(r.req.spec.params.max_new_tokens - r.generated for r in self.rows + new_rows)
        self.cache = KVCache.concat([self.cache, cache], need)
        if self.spec is not None:
            self.spec.merge(drafted, need)
        self.logits = torch.cat([self.logits, logits])
        self.rows = self.rows + new_rows

    def _route(self, adapters: list[int]) -> None:
        """The LoRA adapter of each row of the next forwards (the base for all without --lora)."""
        if self.adapters is not None:
            self.adapters.route(adapters)

    def _compact(self, force: bool = False) -> None:
        """Drop dead rows from the cache: always when forced, else once a quarter of the rows are dead."""
        dead = sum(not r.alive for r in self.rows)
        if not dead or (not force and dead * 4 < len(self.rows)):
            return
        keep = [i for i, r in enumerate(self.rows) if r.alive]
        if not keep:
            self._clear()
            return
        idx = torch.tensor(keep, device=self.gen.device)
        self.cache.keep_rows(idx)
        if self.spec is not None:
            self.spec.keep_rows(idx)
        self.logits = self.logits.index_select(0, idx)
        self.rows = [self.rows[i] for i in keep]

    def _clear(self) -> None:
        self.rows, self.cache, self.logits = [], None, None
        if self.spec is not None:
            self.spec.reset(None)

    def _iterate(self) -> None:
        for r in self.rows:
            if r.alive and r.req.cancelled:
                r.alive = False
                if not r.req.finished:
                    r.req.finished = True
                    self.metrics.count_cancelled()
        self._compact()
        if not self.rows:
            return
        toks, info = sample_rows(self.logits, [r.sampler if r.alive else None for r in self.rows])
        emitted = self._emit([(i, [t], [lp]) for i, (r, t, lp) in enumerate(zip(self.rows, toks, info)) if r.alive])
        if not any(r.alive for r in self.rows):
            self.metrics.add_step(emitted)
            self._clear()
            return
        self._compact()
        feed = torch.tensor([r.last for r in self.rows], device=self.gen.device)
        self._route([r.adapter for r in self.rows])
        if self.spec is None:
            self.logits = self.gen._step(self.cache, feed)
        else:
            emitted += self._speculate(feed)
        self.metrics.add_step(emitted)

    def _emit(self, new: list[tuple[int, list[int], list]]) -> int:
        """Hand rows' new tokens (row index, tokens, logprob infos) to their requests; a row stops at its first
        finish. -> tokens emitted."""
        now = time.perf_counter()
        out: dict[int, tuple[Request, list[Delta]]] = {}
        emitted, finished = 0, []
        for i, tokens, lps in new:
            r = self.rows[i]
            for t, lp in zip(tokens, lps):
                emitted += 1
                d = self._advance(r, t, lp)
                req = r.req
                req.completion_tokens += 1
                if req.first_token_at is None:
                    req.first_token_at = now
                    self.metrics.observe_ttft(now - req.arrival)
                if d.text or d.finish_reason or d.logprobs or d.media:
                    out.setdefault(id(req), (req, []))[1].append(d)
                if d.finish_reason:
                    r.alive = False
                    req.rows_left -= 1
                    finished.append(i)
                    break
        for i in finished if self.prefix is not None else ():  # the reply's KV too: a chat's next turn starts with it
            r = self.rows[i]
            self.prefix.insert(r.prompt + r.out[:-1], lambda a, b, i=i: self.cache.read_row(i, a, b), r.adapter)
        for req, deltas in out.values():
            if deltas:
                req.post(deltas)
            if req.rows_left == 0 and not req.finished:
                req.finished = True
                req.post(DONE)
        return emitted

    def _speculate(self, feed: torch.Tensor) -> int:
        """One speculative round: the draft proposes k tokens per row, the target scores feed + drafts in one
        forward pass, each row keeps its accepted prefix; -> drafted tokens emitted."""
        k, V = self.spec.k, self.vocab
        if self.cache.length + k + 1 > self.cache.max_len:  # rejected drafts leave holes: grow when full
            room = max(r.req.spec.params.max_new_tokens - r.generated for r in self.rows) + k + 1
            self.cache = KVCache.concat([self.cache], room)
            self.spec.grow(room)
        samplers = [r.sampler if r.alive and r.sampler.can_draft else None for r in self.rows]
        if not any(samplers):  # no row takes drafts (penalties, grammars, logprobs): a plain step for both models
            self.logits = self.gen._step(self.cache, feed)
            self.spec.catch_up(feed)
            return 0
        drafts, q = self.spec.propose(feed, samplers)  # (B, k), (B, k, V) | None
        start = self.cache.length
        x = torch.cat([feed[:, None], drafts.to(self.gen.device)], 1)  # (B, k+1)
        logits = self.gen.model.lm_head(self.gen.model.hidden(x, cache=self.cache)).float()[..., :V]  # (B, k+1, V)
        top = logits[:, :k].argmax(-1).cpu()  # (B, k): greedy rows keep the drafts that equal it
        matches = (top == drafts).int().cumprod(1).sum(1).tolist()
        kept, pick, accepted = [], [], []
        for i, s in enumerate(samplers):
            a = 0
            if s is not None:
                if s.params.temperature == 0:
                    a = matches[i]  # a rejection's correction is the argmax the next sampling takes anyway
                else:
                    a, s.residual = accept_drafts(probs(logits[i], s.params), q[i], drafts[i].tolist(), s.gen)
                if a:
                    accepted.append((i, drafts[i, :a].tolist(), [None] * a))
            kept.append(a + 1)
            pick.append(a)
        proposed = k * sum(s is not None for s in samplers)
        self.spec.proposed, self.spec.accepted = self.spec.proposed + proposed, self.spec.accepted + sum(pick)
        self.metrics.add_drafts(proposed, sum(pick))
        if max(pick) == k:
            self.spec.catch_up(drafts[:, -1])
        kept_t = torch.tensor(kept)
        self.cache.rewind(start, kept_t)
        self.spec.cache.rewind(start, kept_t)
        self.logits = logits[torch.arange(len(pick)), torch.tensor(pick)]  # (B, V): after each row's last kept token
        for i, tokens, _ in accepted:
            for t in tokens:
                self.rows[i].sampler.observe(t)
        return self._emit(accepted)

    def _advance(self, r: Row, t: int, lp) -> Delta:
        """Apply token t to row r: stop conditions, text delta, moderation."""
        r.generated += 1
        r.last = t
        r.out.append(t)
        reason, ids, lps, media = None, [], [], []
        is_media = False
        if r.media is not None and t not in r.stop_ids:  # an omni reply: codes and markers are not text
            is_media, media = r.media.feed(t)
        if t in r.stop_ids:
            reason = "stop"
            if lp is not None and r.req.spec.kind == "completion":  # listed, as OpenAI and vLLM do (lm-eval
                lps.append((t, lp[0], lp[1], len(r.stream.text)))  # drops the last entry as the generated one)
        else:
            ids.append(t)
            if lp is not None:
                lps.append((t, lp[0], lp[1], len(r.stream.text)))  # where t's text starts, held-back text included
            if not is_media and r.stream.push(t):
                reason = "stop"
            elif r.sampler.constraint is not None and r.sampler.constraint.finished:
                reason = "stop"  # the grammar admits nothing more
            elif r.generated >= r.req.spec.params.max_new_tokens:
                reason = "length"
        if reason and r.media is not None and r.media.span is not None:
            media += r.media.close()  # the reply ended inside a span: what it holds so far
        if reason:
            r.stream.finish()
        text = r.stream.delta(final=reason is not None)
        if r.filter is not None:
            text, hit = r.filter.feed(text, final=reason is not None)
            if hit:
                reason = "content_filter"
            if r.filter.hits:
                for _ in range(r.filter.hits):
                    self.metrics.count_moderation("output", "refuse" if hit else "redact", "blocklist")
                log.warning("moderation: %s blocked term(s) in the output of request %s",
                            "refused at" if hit else f"redacted {r.filter.hits}", r.req.id)
                r.filter.hits = 0
        withhold = False
        if reason and reason != "content_filter" and self.moderator is not None \
                and self.moderator.flag_output(r.stream.text):
            reason, withhold = "content_filter", True
            self.metrics.count_moderation("output", "refuse", "classifier")
            log.warning("moderation: classifier flagged the output of request %s", r.req.id)
        return Delta(r.index, text, ids, lps, reason, withhold, media)
