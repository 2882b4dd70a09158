"""Faster serving, checked against the plain engine: prefix caching (greedy output identical token for token,
blocks shared and evicted by reference count)."""

import pytest
import torch

pytest.importorskip("fastapi")

from gptlab.chat.template import ensure_chat_tokens, render_ids  # noqa: E402
from gptlab.generate import Generator  # noqa: E402
from gptlab.model import GPT, GPTConfig  # noqa: E402
from gptlab.serve.engine import Engine  # noqa: E402
from gptlab.serve.metrics import Metrics, parse_metrics  # noqa: E402
from gptlab.serve.prefix import PrefixCache  # noqa: E402
from gptlab.serve.protocol import parse_request  # noqa: E402
from gptlab.tokenizer import gpt2_tokenizer  # noqa: E402

from test_serve_engine import _run_engine  # noqa: E402

SYSTEM = ("You are a helpful assistant who answers questions about the weather, trains, and recipes. "
          "Always answer in one short sentence, and never make up facts you do not know. ") * 3


@pytest.fixture(scope="module")
def tok():
    return ensure_chat_tokens(gpt2_tokenizer())


def _model(tok, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=tok.vocab_size, block_size=512, n_layer=2, n_head=2, n_embd=32) | kw
    return GPT(GPTConfig(**cfg)).eval()


def _chat_spec(tok, messages, max_tokens=12, **kw):
    body = {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0, **kw}
    enc = lambda b: ([render_ids(tok, b["messages"])[0]], [""], ())  # noqa: E731
    return parse_request(body, "chat", enc, 512, 32, tok.vocab_size)


def _engines(tok, model, **kw):
    gen = Generator(model, tok)
    return [Engine(gen, Metrics(), max_batch=16, prefix=p, **kw)
            for p in (None, PrefixCache(block=16, max_bytes=1 << 28))]


def test_prefix_cache_gives_the_same_tokens_and_skips_the_shared_prefill(tok):
    model = _model(tok)
    plain, cached = _engines(tok, model)
    for e in (plain, cached):
        e.start()
    try:
        # five turns of one conversation: each turn's prompt starts with the previous turn and its reply
        msgs, turns = [{"role": "system", "content": SYSTEM}], []
        for k, q in enumerate(["What's the weather?", "And tomorrow?", "Trains to Rome?", "A soup recipe?", "Thanks!"]):
            msgs.append({"role": "user", "content": q})
            outs = [_run_engine(e, [_chat_spec(tok, msgs, logprobs=True, top_logprobs=3)])[0] for e in (plain, cached)]
            assert outs[0][1] == outs[1][1], f"turn {k}"  # token for token
            lp = [[x[1] for x in o[3].logprobs] for o in outs]
            assert lp[0] == pytest.approx(lp[1], abs=1e-5)  # and the same distributions
            reply = outs[0][0][0]
            msgs.append({"role": "assistant", "content": reply})
            turns.append(outs[1][3])
        m = parse_metrics(cached.metrics.render())
        prompt = len(render_ids(tok, msgs[:-1])[0])
        assert m["gptlab_prefix_cache_hit_tokens_total"] >= prompt * 0.6, m  # most of each later turn was cached
        # 8 clients sharing the system prompt, joining a running batch: each equal to the plain engine
        specs = [_chat_spec(tok, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}"}],
                            max_tokens=8 + i) for i in range(8)]
        a, b = (_run_engine(e, specs, stagger=0.005) for e in (plain, cached))
        assert [x[1] for x in a] == [x[1] for x in b]
        # echo + logprobs needs the whole prompt's logits: never served from the cache, still equal
        body = {"model": "m", "prompt": SYSTEM, "max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 1}
        from gptlab.serve.protocol import completion_prompts

        spec = lambda: parse_request(body, "completion", lambda b: (*completion_prompts(b, tok, tok.vocab_size), ()),  # noqa: E731
                                     512, 32, tok.vocab_size)
        ra, rb = (_run_engine(e, [spec()])[0][3] for e in (plain, cached))
        assert [x[1] for x in ra.prompt_logprobs[0]] == pytest.approx([x[1] for x in rb.prompt_logprobs[0]], abs=1e-5)
    finally:
        for e in (plain, cached):
            e.stop()


def test_prefix_blocks_are_shared_and_evicted_by_reference_count():
    kv = lambda a, b: torch.zeros(1, 2, 1, b - a, 1)  # noqa: E731  (4 bytes a token a layer... x2)
    c = PrefixCache(block=4, max_bytes=8 * 4 * 4)  # room for 4 blocks of 8 floats
    c.insert(list(range(12)), kv)  # blocks A, B, C chained
    c.insert(list(range(8)) + [50, 51, 52, 53], kv)  # shares A, B; adds D after B
    assert len(c.blocks) == 4
    ka = (None, (0, 1, 2, 3))
    a, b = c.blocks[ka], c.blocks[(ka, (4, 5, 6, 7))]
    assert b.children == 2 and a.children == 1
    assert c.lookup(list(range(12)) + [99])[0] == 12
    assert c.lookup(list(range(12)))[0] == 8  # one token is always left to prefill
    c.insert([7, 7, 7, 7, 7], kv)  # over budget: the least recent tip goes (D), never a block with children
    assert len(c.blocks) == 4 and c.lookup(list(range(8)) + [50, 51, 52, 53, 0])[0] == 8
    assert c.lookup(list(range(12)) + [0])[0] == 12


def _completion(tok, prompt, max_tokens, **kw):
    from gptlab.serve.protocol import completion_prompts

    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw}
    return parse_request(body, "completion", lambda b: (*completion_prompts(b, tok, tok.vocab_size), ()), 512, 32,
                         tok.vocab_size)


@pytest.mark.parametrize("draft_seed", [0, 1])  # the target itself (all accepted) and another model (few)
def test_speculative_greedy_output_equals_plain_decoding(tok, draft_seed):
    from gptlab.serve.speculative import Speculator

    target = _model(tok, n_layer=3, n_embd=48)
    draft = _model(tok, n_layer=3, n_embd=48) if draft_seed == 0 else _model(tok, seed=draft_seed)
    gen = Generator(target, tok)
    plain = Engine(gen, Metrics(), max_batch=16)
    spec = Speculator(Generator(draft, tok), k=3)
    fast = Engine(gen, Metrics(), max_batch=16, spec=spec, prefix=PrefixCache())
    prompts = ["Hello there", "The quick brown fox jumps over", "1 2 3", "a", "Once upon a time, in"]
    specs = lambda: [_completion(tok, p, 9 + 3 * i) for i, p in enumerate(prompts)] + [  # noqa: E731
        _completion(tok, "Sampled", 12, temperature=0.9, seed=4, n=2),  # sampled rows share the batch
        _completion(tok, "With a penalty", 10, frequency_penalty=1.0)]  # a row that takes no drafts
    for e in (plain, fast):
        e.start()
    try:
        a = _run_engine(plain, specs(), stagger=0.003)
        b = _run_engine(fast, specs(), stagger=0.003)
        for (ta, ka, _, _), (tb, kb, _, _) in zip(a[:5] + a[6:], b[:5] + b[6:]):
            assert ka == kb and ta == tb
        assert all(len(t) == 12 for t in b[5][1].values())
        # a batch in which no row takes drafts: plain steps for both models, caches still in step
        alone = [_completion(tok, "With a penalty", 10, frequency_penalty=1.0), _completion(tok, "And logprobs", 6, logprobs=2)]
        assert [x[1] for x in _run_engine(fast, alone)] == [x[1] for x in _run_engine(plain, alone)]
        assert [x[1] for x in _run_engine(fast, specs()[:2])] == [x[1] for x in a[:2]]  # and drafting again after
        rate = spec.accepted / spec.proposed
        assert rate == 1.0 if draft_seed == 0 else rate < 0.9, rate
    finally:
        for e in (plain, fast):
            e.stop()


def test_acceptance_rule_samples_the_target_distribution():
    """Count: with drafts from q and the standard rule, the first two tokens emitted are distributed as p
    (position by position, p fixed here), whatever q is."""
    from gptlab.serve.speculative import accept_drafts

    g = torch.Generator().manual_seed(0)
    V, k, N = 4, 2, 20000
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.7, 0.1, 0.1, 0.1]])
    counts = torch.zeros(2, V)
    for _ in range(N):
        d = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(k)]
        a, residual = accept_drafts(p, q, d, g)
        seq = d[:a] + [int(torch.multinomial(residual if residual is not None else p[a], 1, generator=g))]
        if len(seq) < 2:  # a rejection at the first draft: the next round starts from p[1]
            seq.append(int(torch.multinomial(p[1], 1, generator=g)))
        counts[0, seq[0]] += 1
        counts[1, seq[1]] += 1
    freq = counts / N
    assert torch.allclose(freq, p[:2], atol=0.015), freq  # 3.4 sigma at N=20000
    # and the drafts alone would not be: q's first position is far from p's
    assert (q[0] - p[0]).abs().max() > 0.3
