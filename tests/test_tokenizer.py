"""Tokenizer tests: exact GPT-2 ids against Hugging Face, BPE training against a naive reference."""

from __future__ import annotations

import inspect
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import regex

from gptlab.errors import GptlabError
from gptlab.tokenizer import (
    TOKENIZER_FILE,
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    build_tokenizer,
    gpt2_tokenizer,
    load_tokenizer,
    train_bpe,
)
from gptlab.tokenizer import bpe as bpe_mod
from gptlab.tokenizer.bpe import GPT2_FILE_SHA256, GPT2_PATTERN, gpt2_data_dir

EOT = "<|endoftext|>"
# Contractions (incl. upper case, which GPT-2's regex does not treat as contractions), tabs, runs of
# spaces, CRLF, trailing spaces, unicode spaces (NBSP, em, ideographic, thin, NEL, line/para sep),
# zero-width joiners, combining marks, Chinese, emoji, digits and punctuation runs.
TRICKY = (
    "Hello world! It's we'll they've I'm you'd he's can't don't IT'S WE'LL\n\t\ttabs  two  spaces   three\r\n"
    "windows line\r\n trailing   \n\u00a0nbsp\u2003emsp\u3000ideographic\u2009thin\u200bzwsp\u0085nel\u2028ls\u2029ps\n"
    "中文测试：你好，世界！ 🎉🚀 👨\u200d👩\u200d👧\u200d👦 🇺🇸 café naïve e\u0301 ÅΩ 12345 3.14 $100 ... ___ ---- \v\f end   \n\n\n  "
)


def _shakespeare(shared_data: Path) -> str:
    path = shared_data / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------- GPT-2
@pytest.fixture(scope="module")
def hf_gpt2():
    transformers = pytest.importorskip("transformers")
    d = gpt2_data_dir()
    cls = transformers.GPT2TokenizerFast
    # transformers 4 takes vocab_file/merges_file; 5 takes vocab/merges (and silently ignores the old names).
    if "vocab" in inspect.signature(cls.__init__).parameters:
        tok = cls(vocab=str(d / "encoder.json"), merges=str(d / "vocab.bpe"))
    else:
        tok = cls(vocab_file=str(d / "encoder.json"), merges_file=str(d / "vocab.bpe"))
    assert len(tok) == 50257  # guard against an empty tokenizer making the comparison vacuous
    return tok


def test_gpt2_vocab():
    tok = gpt2_tokenizer()
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.special_tokens == {EOT: 50256}
    assert tok.token_dtype == np.uint16
    assert tok.encode("hello world") == [31373, 995]
    assert gpt2_tokenizer() is tok  # cached per process


def test_gpt2_matches_huggingface_tricky(hf_gpt2):
    tok = gpt2_tokenizer()
    ids = tok.encode(TRICKY)
    assert ids == hf_gpt2.encode(TRICKY)
    assert tok.decode(ids) == TRICKY


def test_gpt2_matches_huggingface_shakespeare(hf_gpt2, shared_data):
    text = _shakespeare(shared_data)
    tok = gpt2_tokenizer()
    ids = tok.encode(text)
    assert len(ids) == 338025
    assert ids == hf_gpt2.encode(text)
    assert tok.decode(ids) == text


def test_gpt2_sha256_mismatch_tampered_copy(tmp_path):
    tampered = tmp_path / "vocab.bpe"
    shutil.copy(gpt2_data_dir() / "vocab.bpe", tampered)
    with tampered.open("ab") as f:
        f.write(b"x")
    with pytest.raises(GptlabError) as e:
        bpe_mod._check_sha256(tampered, GPT2_FILE_SHA256["vocab.bpe"])
    msg = str(e.value)
    assert str(tampered) in msg and GPT2_FILE_SHA256["vocab.bpe"] in msg and "\n" not in msg


def test_gpt2_sha256_mismatch_expected_hash(monkeypatch):
    real = GPT2_FILE_SHA256["encoder.json"]
    monkeypatch.setitem(GPT2_FILE_SHA256, "encoder.json", "0" * 64)
    with pytest.raises(GptlabError, match="encoder.json") as e:
        gpt2_tokenizer.__wrapped__()  # bypass the per-process cache
    assert real in str(e.value) and "0" * 64 in str(e.value)


def test_gpt2_decode_invalid_utf8_and_bad_ids():
    tok = gpt2_tokenizer()
    partial = tok.encode("🎉")[:1]  # first token of a multi-token emoji: incomplete UTF-8
    assert tok.decode_bytes(partial) != b"" and "\ufffd" in tok.decode(partial)
    assert tok.decode(np.array(tok.encode("numpy ids"))) == "numpy ids"
    with pytest.raises(GptlabError, match="50257"):
        tok.decode([50257])


# ------------------------------------------------------------------------------ special tokens
@pytest.fixture(scope="module")
def small_bpe() -> BPETokenizer:
    corpus = ["hello world <|endoftext|> hello there <|endoftext|> 你好世界 🎉🎉 hello"] * 5
    return train_bpe(corpus, 40, progress=False)


@pytest.fixture(params=["gpt2", "char", "bpe"])
def any_tokenizer(request, small_bpe) -> Tokenizer:
    if request.param == "gpt2":
        return gpt2_tokenizer()
    if request.param == "char":
        return CharTokenizer.from_text("hello <|endoftext|> world")
    return small_bpe


def test_special_tokens_are_opt_in(any_tokenizer):
    tok = any_tokenizer
    text = "hello <|endoftext|>"
    plain = tok.encode(text)
    assert tok.eot_id not in plain
    assert tok.decode(plain) == text
    special = tok.encode(text, allowed_special="all")
    assert special[-1] == tok.eot_id and special.count(tok.eot_id) == 1
    assert tok.encode(text, allowed_special={EOT}) == special
    assert tok.decode(special) == text
    assert tok.encode_batch([text, "hello"]) == [plain, tok.encode("hello")]
    with pytest.raises(GptlabError):
        tok.encode(text, allowed_special={"<|nope|>"})


# ------------------------------------------------------------------------------------ char
def test_char_tokenizer_roundtrip_and_save(tmp_path):
    text = "hello, wörld! 世界\n"
    tok = CharTokenizer.from_text(text)
    chars = "".join(sorted(set(text)))
    assert tok.chars == chars and tok.vocab_size == len(chars) + 1 and tok.eot_id == len(chars)
    ids = tok.encode(text)
    assert ids == [chars.index(c) for c in text]
    assert tok.decode(ids) == text and tok.decode_bytes(ids) == text.encode()
    path = tok.save(tmp_path)
    assert path == tmp_path / TOKENIZER_FILE
    d = json.loads(path.read_text())
    assert d == {"format": "gptlab-tokenizer", "version": 1, "kind": "char", "chars": chars,
                 "special_tokens": {EOT: len(chars)}}
    again = load_tokenizer(tmp_path)
    assert isinstance(again, CharTokenizer) and again.encode(text) == ids and again.eot_id == tok.eot_id


def test_char_unknown_character():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(GptlabError, match="'z'"):
        tok.encode("abz")
    with pytest.raises(GptlabError):
        tok.decode([99])


# ------------------------------------------------------------------------------- train_bpe
def _merge(word: list[int], pair: tuple[int, int], new: int) -> list[int]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def naive_train(texts: list[str], num_merges: int) -> tuple[list[bytes], list[tuple[tuple[int, int], int]]]:
    """Reference BPE: recount every pair from scratch each step; ties -> smallest pair."""
    chunks = Counter(m.encode() for t in texts for m in regex.findall(GPT2_PATTERN, t))
    words = [(list(c), n) for c, n in chunks.items()]
    vocab = [bytes([i]) for i in range(256)]
    merges = []
    for _ in range(num_merges):
        counts: Counter = Counter()
        for w, n in words:
            for p in zip(w, w[1:]):
                counts[p] += n
        if not counts or max(counts.values()) < 2:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        tok = vocab[best[0]] + vocab[best[1]]
        if tok not in vocab:
            vocab.append(tok)
        merges.append((best, vocab.index(tok)))
        words = [(_merge(w, best, merges[-1][1]), n) for w, n in words]
    return vocab, merges


def naive_encode(text: str, merges) -> list[int]:
    """Reference encoding: apply the merges, in the order learned, to each regex chunk."""
    ids = []
    for chunk in regex.findall(GPT2_PATTERN, text):
        w = list(chunk.encode())
        for pair, new in merges:
            w = _merge(w, pair, new)
        ids += w
    return ids


def _vocab(tok: BPETokenizer) -> list[bytes]:
    ranks = tok.mergeable_ranks
    assert sorted(ranks.values()) == list(range(len(ranks)))
    return sorted(ranks, key=ranks.get)


def test_train_bpe_hand_example():
    # Wikipedia's example: aa -> Z, then ab (tied at 2 with (Z, a); smaller pair wins) -> Y, then ZY.
    tok = train_bpe(["aaabdaaabac"], 10, progress=False)
    assert _vocab(tok)[256:] == [b"aa", b"ab", b"aaab"]
    assert tok.vocab_size == 260 and tok.eot_id == 259
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]
    assert tok.encode("aaab aab") == [258, ord(" "), 256, ord("b")]  # in " aab", aa (256) beats ab (257)
    assert tok.token_dtype == np.uint16


def test_train_bpe_stops_when_no_pair_repeats():
    tok = train_bpe(["abcd"], 100, progress=False)
    assert tok.vocab_size == 257 and tok.eot_id == 256


MIXED = [
    "the cat sat on the mat; the cat's hat is flat. THE CAT!\n\n  indented  twice\r\n",
    "中文测试：你好，世界！你好，中文。 🎉🎉🚀 emoji 🎉 and more emoji 🚀🚀",
    "numbers 123 1234 12345 and 3.14159, and again 123 1234.\ttab\tseparated\t",
] * 3


@pytest.mark.parametrize("num_merges", [1, 7, 60, 500])
def test_train_bpe_matches_naive_reference(num_merges):
    tok = train_bpe(MIXED, num_merges, progress=False)
    vocab, merges = naive_train(MIXED, num_merges)
    assert _vocab(tok) == vocab
    for text in MIXED + ["unseen: the hat-cat 你好 🎉🚀 4321"]:
        assert tok.encode(text) == naive_encode(text, merges)


def test_train_bpe_matches_naive_on_shakespeare(shared_data):
    texts = [_shakespeare(shared_data)[:20_000]]
    tok = train_bpe(texts, 150, progress=False)
    vocab, merges = naive_train(texts, 150)
    assert _vocab(tok) == vocab
    sample = _shakespeare(shared_data)[20_000:23_000]
    assert tok.encode(sample) == naive_encode(sample, merges)


def test_train_bpe_roundtrip_unique_and_save(tmp_path):
    tok = train_bpe(MIXED, 200, name="mixed", progress=False)
    vocab = _vocab(tok)
    assert len(set(vocab)) == len(vocab)
    assert tok.vocab_size == len(vocab) + 1 and tok.eot_id == len(vocab)
    for text in MIXED + [TRICKY, "完全没见过的汉字 🦄🦄 zebra"]:
        assert tok.decode(tok.encode(text)) == text
    path = tok.save(tmp_path / "tok.json")
    d = json.loads(path.read_text())
    assert (d["format"], d["version"], d["kind"], d["name"]) == ("gptlab-tokenizer", 1, "bpe", "mixed")
    assert d["pattern"] == GPT2_PATTERN and len(d["ranks"]) == len(vocab) and d["special_tokens"] == {EOT: len(vocab)}
    again = load_tokenizer(path)
    assert isinstance(again, BPETokenizer) and again.vocab_size == tok.vocab_size
    for text in [TRICKY, MIXED[1]]:
        assert again.encode(text) == tok.encode(text)
        assert again.decode(tok.encode(text)) == text


def test_train_bpe_special_token_never_learned_from_text():
    text = "<|endoftext|>" * 50 + " <|endoftext|>" * 50
    tok = train_bpe([text], 100, progress=False)
    ids = tok.encode(text)
    assert tok.eot_id not in ids and max(ids) < tok.eot_id
    assert tok.decode(ids) == text


def test_train_bpe_bad_num_merges():
    with pytest.raises(GptlabError):
        train_bpe(["abc"], -1, progress=False)


# ------------------------------------------------------------------------- load / build errors
def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(GptlabError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(GptlabError, match="not found"):
        load_tokenizer(tmp_path)  # a directory without tokenizer.gptlab.json
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(GptlabError, match="not valid JSON"):
        load_tokenizer(bad)
    good = CharTokenizer.from_text("abc").to_dict()
    for change, match in [({"kind": "wordpiece"}, "unknown tokenizer kind"), ({"version": 2}, "version"),
                          ({"format": "other"}, "not a gptlab tokenizer"), ({"chars": "aab"}, "unique")]:
        bad.write_text(json.dumps(good | change))
        with pytest.raises(GptlabError, match=match) as e:
            load_tokenizer(bad)
        assert "\n" not in str(e.value)


def test_load_bpe_rejects_bad_ranks(tmp_path, small_bpe):
    d = small_bpe.to_dict()
    path = tmp_path / TOKENIZER_FILE
    for ranks, match in [(d["ranks"] + [d["ranks"][280]], "duplicate"), (d["ranks"][1:], "single-byte"),
                         (d["ranks"][:-1] + ["!!not base64"], "malformed")]:
        path.write_text(json.dumps(d | {"ranks": ranks}))
        with pytest.raises(GptlabError, match=match):
            load_tokenizer(tmp_path)
    path.write_text(json.dumps(d | {"special_tokens": {EOT: 5}}))
    with pytest.raises(GptlabError, match="special token ids"):
        load_tokenizer(path)


def test_build_tokenizer(tmp_path):
    assert build_tokenizer("gpt2") is gpt2_tokenizer()
    char = build_tokenizer("char", iter(["ab", "ca"]))
    assert isinstance(char, CharTokenizer) and char.chars == "abc"
    bpe = build_tokenizer("bpe:3", ["aaabdaaabac"], progress=False)
    assert isinstance(bpe, BPETokenizer) and bpe.vocab_size == 260
    bpe.save(tmp_path)
    assert build_tokenizer(str(tmp_path)).encode("aaab") == [258]
    for spec in ["bpe:x", "bpe", "gpt3", str(tmp_path / "nope")]:
        with pytest.raises(GptlabError, match="bpe:N"):
            build_tokenizer(spec, ["text"])
    with pytest.raises(GptlabError, match="needs training text"):
        build_tokenizer("char", None)
