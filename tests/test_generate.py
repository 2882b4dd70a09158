import warnings

import pytest
import torch

from gptlab.errors import GptlabError
from gptlab.generate import Generator, KVCache, SamplingParams
from gptlab.generate.logits import NgramBlocker, filter_logits
from gptlab.generate.text import TextStream
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import gpt2_tokenizer, train_bpe


def _model(attention=("dense",), vocab=100, block=64, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, block_size=block, n_layer=3, n_head=2, n_embd=32, attention=attention,
                    local_window=5, sparse_stride=4, sparse_c=1)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["hello world, the quick brown fox jumps over the lazy dog. 你好，世界 🙂🎉"] * 20, 60, progress=False)


@pytest.mark.parametrize("attention", [("dense",), ("local",), ("dense", "local"), ("strided",), ("fixed",)])
def test_cached_decoding_equals_full_recompute_at_every_step(attention):
    m = _model(attention)
    x = torch.randint(0, 100, (2, 48))
    full = m(x)[0]
    cache = KVCache(m.cfg, 2, 48, "cpu", torch.float32)
    steps = [m.lm_head(m.hidden(x[:, :9], cache=cache))]  # prefill 9, then one token at a time
    steps += [m.lm_head(m.hidden(x[:, t:t + 1], cache=cache)) for t in range(9, 48)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_local_layers_keep_only_their_window():
    m = _model(("dense", "local"))
    cache = KVCache(m.cfg, 1, 48, "cpu", torch.float32)
    assert cache.layers[0].k.size(2) == 48 and cache.layers[1].k.size(2) == m.cfg.local_window


@pytest.mark.parametrize("attention", [("dense",), ("dense", "local")])
def test_padded_batch_equals_prompts_one_by_one(tok, attention):
    m = _model(attention, vocab=tok.vocab_size)
    g = Generator(m, tok)
    prompts = ["hello", "the quick brown fox jumps", "你好"]
    p = SamplingParams(max_new_tokens=12, temperature=0)
    batch = g.generate(prompts, p)
    for pr, b in zip(prompts, batch):
        assert g.generate([pr], p)[0].token_ids == b.token_ids
    # same check on logits: the padded row's prefill equals its unpadded prefill
    ids = [tok.encode(x) for x in prompts]
    _, lb = g._prefill(ids, 4)
    for i, r in enumerate(ids):
        _, l1 = g._prefill([r], 4)
        torch.testing.assert_close(lb[i], l1[0], atol=1e-5, rtol=1e-5)


def test_seed_gives_same_text_and_sampling_is_random_otherwise(tok):
    g = Generator(_model(vocab=tok.vocab_size), tok)
    p = SamplingParams(max_new_tokens=20, temperature=1.0, seed=7)
    a, b = g.generate(["hello"], p)[0], g.generate(["hello"], p)[0]
    c = g.generate(["hello"], SamplingParams(max_new_tokens=20, temperature=1.0, seed=8))[0]
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_filters_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: torch.isfinite(filter_logits(logits, SamplingParams(**kw))).nonzero()[:, 1].tolist()  # noqa: E731
    assert kept(top_k=2) == [0, 1]
    assert kept(top_p=0.8) == [0, 1]  # 0.5 + 0.3 reaches 0.8
    assert kept(top_p=0.81) == [0, 1, 2]
    assert kept(top_p=0.1) == [0]  # always at least one
    assert kept(min_p=0.5) == [0, 1]  # ≥ 0.25
    assert kept(temperature=2.0) == [0, 1, 2, 3]


def test_repetition_penalty_and_no_repeat_ngram(tok):
    m = _model(vocab=tok.vocab_size, seed=3)
    g = Generator(m, tok)
    out = g.generate(["hello"], SamplingParams(max_new_tokens=40, temperature=0, no_repeat_ngram_size=2))[0]
    seq = tok.encode("hello") + out.token_ids
    bigrams = list(zip(seq, seq[1:]))
    assert len(bigrams) == len(set(bigrams))  # no bigram twice, prompt included
    plain = g.generate(["hello"], SamplingParams(max_new_tokens=40, temperature=0))[0].token_ids
    pen = g.generate(["hello"], SamplingParams(max_new_tokens=40, temperature=0, repetition_penalty=5.0))[0].token_ids
    assert len(set(pen)) > len(set(plain))
    nb = NgramBlocker(3, [[1, 2, 3, 1, 2]])
    assert nb.banned() == [[3]]


def test_stop_strings_stop_tokens_and_lengths(tok):
    m = _model(vocab=tok.vocab_size, seed=1)
    g = Generator(m, tok)
    free = g.generate(["the"], SamplingParams(max_new_tokens=30, temperature=0))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 30
    stop = free.text[5:8]
    out = g.generate(["the"], SamplingParams(max_new_tokens=30, temperature=0, stop=(stop,)))[0]
    assert out.finish_reason == "stop" and out.text == free.text[:free.text.find(stop)]
    first = free.token_ids[3]
    out = g.generate(["the"], SamplingParams(max_new_tokens=30, temperature=0, stop_token_ids=(first,)))[0]
    assert out.token_ids == free.token_ids[:free.token_ids.index(first)] and out.finish_reason == "stop"


def test_streaming_never_splits_utf8_and_matches_generate(tok):
    s = TextStream(tok)
    text = "你好，世界 🙂🎉 done"
    deltas = []
    for t in tok.encode(text):
        s.push(t)
        deltas.append(s.delta())
    s.finish()
    deltas.append(s.delta(final=True))
    assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas)
    # byte-level BPE does split these characters across tokens: the test exercises the hold-back
    assert any(len(tok.decode_bytes([t]).decode("utf-8", "replace")) != len(tok.decode_bytes([t])) or
               "\ufffd" in tok.decode_bytes([t]).decode("utf-8", "replace") for t in tok.encode("你好🙂"))
    g = Generator(_model(vocab=tok.vocab_size, seed=2), tok)
    p = SamplingParams(max_new_tokens=25, temperature=0.9, seed=3)
    assert "".join(g.stream("你好", p)) == g.generate(["你好"], p)[0].text


def test_stream_holds_back_a_possible_stop_string(tok):
    s = TextStream(tok, stops=("lazy dog",))
    out = []
    for t in tok.encode("the quick brown fox jumps over the lazy dog and more"):
        stopped = s.push(t)
        out.append(s.delta())
        if stopped:
            break
    out.append(s.delta(final=True))
    assert "".join(out) == "the quick brown fox jumps over the " and not any("lazy" in d for d in out)


def test_over_long_prompt_is_cropped_with_warning_or_refused_in_strict_mode(tok):
    g = Generator(_model(vocab=tok.vocab_size, block=32), tok)
    ids = list(range(1, 60))
    with pytest.warns(UserWarning, match="keeping the last 22 prompt tokens"):
        out = g.generate([ids], SamplingParams(max_new_tokens=10, temperature=0))[0]
    assert out.prompt_tokens == 22 and len(out.token_ids) <= 10
    with pytest.raises(GptlabError, match="does not fit the context window"):
        g.generate([ids], SamplingParams(max_new_tokens=10, strict=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = g.generate([ids[:5]], SamplingParams(max_new_tokens=100, temperature=0))[0]  # fits: not cropped
    assert out.prompt_tokens == 5 and len(out.token_ids) <= 27


def test_beam_search_scores_at_least_as_well_as_greedy(tok):
    m = _model(vocab=tok.vocab_size, seed=4)
    g = Generator(m, tok)
    ids = tok.encode("the quick")

    def logprob(cont):
        x = torch.tensor([ids + cont])
        with torch.no_grad():
            lp = torch.log_softmax(m(x)[0][0, len(ids) - 1:-1], -1)
        return lp.gather(1, torch.tensor(cont)[:, None]).sum().item()

    greedy = g.generate([ids], SamplingParams(max_new_tokens=8, temperature=0))[0].token_ids
    beam = g.generate([ids], SamplingParams(max_new_tokens=8, num_beams=4, length_penalty=0.0))[0].token_ids
    assert len(beam) == 8 and logprob(beam) >= logprob(greedy) - 1e-4
    one = g.generate([ids], SamplingParams(max_new_tokens=8, num_beams=1, temperature=0))[0].token_ids
    assert one == greedy


def test_no_autograd_state_and_bf16_generation(tok):
    m = _model(vocab=tok.vocab_size)
    g = Generator(m, tok, dtype=torch.bfloat16)
    out = g.generate(["hello"], SamplingParams(max_new_tokens=5, temperature=0))[0]
    assert len(out.token_ids) == 5 and next(m.parameters()).dtype == torch.bfloat16
    cache = KVCache(m.cfg, 1, 8, "cpu", torch.bfloat16)
    with torch.inference_mode():
        h = m.hidden(torch.tensor([[1, 2, 3]]), cache=cache)
    assert not h.requires_grad and not cache.layers[0].k.requires_grad


def test_gpt2_tokenizer_generation_roundtrip():
    tok = gpt2_tokenizer()
    g = Generator(_model(vocab=tok.vocab_size, block=32), tok)
    outs = g.generate(["Hello", "Bonjour"], SamplingParams(max_new_tokens=4, temperature=0.7, seed=0), num_samples=2)
    assert len(outs) == 4 and all(o.prompt_tokens >= 1 for o in outs)


def test_generate_and_chat_commands(tmp_path, tok):
    import subprocess
    import sys

    from gptlab.run import write_run_config
    from gptlab.run.format import save_model

    m = _model(vocab=tok.vocab_size, block=64)
    write_run_config(tmp_path / "run", m.cfg, tok, stage="test")
    save_model(m, tmp_path / "run" / "model.safetensors")
    (tmp_path / "prompts.txt").write_text("hello\nthe quick\n")
    run = lambda *args, **kw: subprocess.run([sys.executable, "-m", "gptlab", *args], capture_output=True,  # noqa: E731
                                             text=True, timeout=120, **kw)
    out = run("generate", str(tmp_path / "run"), "--file", str(tmp_path / "prompts.txt"), "--temperature", "0",
              "--max-new-tokens", "8")
    assert out.returncode == 0 and out.stdout.count("-" * 40) == 1
    assert out.stdout.startswith("hello") and "\nthe quick" in out.stdout
    streamed = run("generate", str(tmp_path / "run"), "--prompt", "hello", "--temperature", "0", "--max-new-tokens",
                   "8", "--stream")
    assert streamed.stdout.strip() == out.stdout.split("\n" + "-" * 40)[0].strip()
    strict = run("generate", str(tmp_path / "run"), "--prompt", "hello " * 80, "--strict")
    *info, err = strict.stderr.splitlines()  # the dtype choice, then the one-line error
    assert strict.returncode == 2 and err.startswith("error: ") and "context window" in err
    assert all(ln.startswith("dtype auto → ") for ln in info) and len(info) <= 1
    chat = run("chat", str(tmp_path / "run"), "--max-new-tokens", "5", "--seed", "0",
               input="hi there\n/system be brief\nagain\n/reset\n/quit\n")
    assert chat.returncode == 0 and chat.stdout.count("you> ") >= 4


def test_rows_keep_their_own_length_and_seed_whatever_the_batch(tok):
    g = Generator(_model(vocab=tok.vocab_size, block=64), tok)
    long = list(range(1, 61))  # leaves room for 4 new tokens
    p = SamplingParams(max_new_tokens=12, temperature=0.8, seed=5)
    alone = g.generate(["hello"], p)[0]
    batch = g.generate([long, "hello"], p)
    assert len(batch[0].token_ids) <= 4 and batch[0].finish_reason in ("length", "stop")
    assert batch[1].token_ids == alone.token_ids  # neither shortened nor re-seeded by its neighbour


def test_model_with_more_rows_than_tokenizer_never_samples_padding_ids(tok):
    g = Generator(_model(vocab=tok.vocab_size + 50, seed=6), tok)
    out = g.generate(["hello"] * 4, SamplingParams(max_new_tokens=30, temperature=5.0, seed=0))
    assert all(t < tok.vocab_size for o in out for t in o.token_ids)


def test_earliest_stop_string_wins_and_bad_prompts_are_refused(tok):
    s = TextStream(tok, stops=("dog", "quick brown"))
    for t in tok.encode("the quick brown fox jumps over the lazy dog"):
        if s.push(t):
            break
    assert s.text == "the "
    g = Generator(_model(vocab=tok.vocab_size), tok)
    with pytest.raises(GptlabError, match="list of strings or of token-id lists"):
        g.generate([1, 2, 3])
    with pytest.raises(GptlabError, match="token ids must be in"):
        g.generate([[1, 10**6]])


def test_beam_search_never_emits_a_stop_token(tok):
    m = _model(vocab=tok.vocab_size, seed=4)
    g = Generator(m, tok)
    ids = tok.encode("the quick")
    with torch.no_grad():
        first = m(torch.tensor([ids]))[0][0, -1].argmax().item()
    # make the greedy first token a stop token: the one-token hypothesis ends at once and must be kept
    out = g.generate([ids], SamplingParams(max_new_tokens=10, num_beams=4, length_penalty=0.0,
                                           stop_token_ids=(first,)))[0]
    assert out.finish_reason in ("stop", "length") and first not in out.token_ids


def test_packed_cpu_linears_match_and_follow_weight_updates():
    from gptlab.generate.packed import available, pack_linears

    if not available():
        pytest.skip("this torch build has no oneDNN (mkldnn) linear prepacking")
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 40)
    x = torch.randn(3, 5, 48)
    ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
    assert pack_linears(lin)
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        lin.weight.mul_(2.0)  # an optimizer step: the packed copy must be rebuilt
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
    y = lin(x)  # with grad: the plain path, so training through a packed module still works
    y.sum().backward()
    assert lin.weight.grad is not None
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16  # under autocast the packed fp32 path steps aside
