"""The omni foundations: the learned image and speech tokenizers, the one vocabulary, content parts in the
chat template, the span grammar of the generator, and the embedded corpus — each against an independent
reference (scikit-learn's digits, eSpeak NG speech, PocketSphinx, hand-built ids)."""

import base64
import json

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("soundfile")

from gptlab.chat.template import CHAT_TOKENS, END, render_ids
from gptlab.errors import GptlabError
from gptlab.generate import Generator, SamplingParams
from gptlab.generate.spans import AudioChunker, SpanGrammar, split_reply
from gptlab.model import GPT, GPTConfig
from gptlab.omni.corpus import TEST_VOICE, TRAIN_VOICES, build_corpus, split_digits
from gptlab.omni.espeak import speak
from gptlab.omni.judges import SpeechJudge, word_accuracy
from gptlab.omni.media import load_part, png_bytes, wav_bytes
from gptlab.tokenizer import (CharTokenizer, MelAudioCodec, OmniTokenizer, PatchImageCodec, load_tokenizer)
from gptlab.tokenizer.base import Codec
from gptlab.tokenizer.image import psnr


@pytest.fixture(scope="module")
def digits():
    images, labels, held = split_digits(0)
    return images, labels, held


@pytest.fixture(scope="module")
def image_codec(digits):
    images, _, held = digits
    return PatchImageCodec.train(list(images[~held]), size=8, patch=2, codes=256)


@pytest.fixture(scope="module")
def speech():
    texts = ["four two nine", "seven", "one eight", "zero three five", "six"]
    return {t: speak(t, v, 170, 50) for t in texts for v in ("en-us",)}


@pytest.fixture(scope="module")
def audio_codec(speech):
    more = [speak(t, v, r, 50) for t in speech for v in TRAIN_VOICES[:3] for r in (150, 190)]
    return MelAudioCodec.train([*speech.values(), *more], codes=128)


@pytest.fixture(scope="module")
def omni(image_codec, audio_codec):
    text = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ?.<|>/\n").with_special_tokens(CHAT_TOKENS)
    return OmniTokenizer(text, image_codec, audio_codec)


# --- modality tokenizers ------------------------------------------------------------------------
def test_image_codec_reconstructs_held_out_digits(digits, image_codec, tmp_path):
    images, _, held = digits
    test = images[held][:100]
    scores = [psnr(x, image_codec.decode(image_codec.encode(x))) for x in test]
    assert image_codec.tokens_per_item == 16 and image_codec.n_codes == 256
    assert np.mean(scores) > 24  # a 2×2-patch codebook: 16 tokens for 64 pixels
    # an untrained codebook (random patches) does much worse: the codebook is learned
    rnd = PatchImageCodec(np.random.default_rng(0).random((256, 4)), 8, 2, 1)
    assert np.mean([psnr(x, rnd.decode(rnd.encode(x))) for x in test]) < np.mean(scores) - 5
    image_codec.save(tmp_path / "img.json")
    back = load_tokenizer(tmp_path / "img.json", Codec)
    assert back.encode(test[0]) == image_codec.encode(test[0])
    with pytest.raises(GptlabError, match="holds a .image-patch-vq. tokenizer; a text tokenizer is needed here"):
        load_tokenizer(tmp_path / "img.json")  # a codec is not a text tokenizer
    with pytest.raises(GptlabError, match="an image is 16 codes"):
        image_codec.decode([0] * 15)


def test_image_codec_takes_any_size_and_colour(image_codec):
    big = np.zeros((32, 32, 3), np.uint8)
    big[8:24, 12:20] = 255  # a bright bar, upscaled and in colour
    codes = image_codec.encode(big)
    assert len(codes) == 16 and image_codec.decode(codes).shape == (8, 8)


def test_speech_codec_rate_level_and_intelligibility(speech, audio_codec, tmp_path):
    wave = speech["four two nine"]
    codes = audio_codec.encode(wave)
    assert audio_codec.codes_per_second == 50
    assert len(codes) == len(wave) // 320 + 1
    back = audio_codec.decode(codes)
    assert abs(len(back) - len(wave)) < 320
    assert 0.3 < np.sqrt((back ** 2).mean()) / np.sqrt((wave ** 2).mean()) < 3  # the level survives
    judge = SpeechJudge()
    assert judge(wave) == "four two nine"  # PocketSphinx hears the real speech
    assert word_accuracy(judge(back), "four two nine") >= 2 / 3  # and most of it through the tokenizer
    audio_codec.save(tmp_path / "aud.json")
    assert load_tokenizer(tmp_path / "aud.json", Codec).encode(wave) == codes


# --- the one vocabulary and the chat template ---------------------------------------------------
def test_omni_vocabulary_layout_and_no_forged_markers(omni, tmp_path):
    V = omni.text.vocab_size
    assert omni.code_range("image") == range(V, V + 256)
    assert omni.code_range("audio") == range(V + 256, V + 256 + 128)
    assert omni.vocab_size == V + 256 + 128 + 4
    forged = omni.encode("<|image|>")  # user text: characters, never the marker
    assert len(forged) == len("<|image|>") and omni.markers["<|image|>"] not in forged
    omni.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert back.vocab_size == omni.vocab_size and back.special_tokens == omni.special_tokens
    grown = omni.with_special_tokens(["<|extra|>"])
    assert grown.special_tokens["<|extra|>"] == omni.vocab_size and grown.code_range("audio") == omni.code_range("audio")


def test_content_parts_render_with_markers_and_assistant_media_is_trained(omni, digits, speech):
    image = digits[0][0]
    msgs = [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, {"type": "image", "image": image}]},
            {"role": "assistant", "content": [{"type": "audio", "audio": speech["seven"]}, {"type": "text", "text": "seven"}]}]
    ids, mask = render_ids(omni, msgs, add_generation_prompt=False)
    sp = omni.special_tokens
    img = [sp["<|image|>"], *(omni.code_range("image").start + c for c in omni.codecs["image"].encode(image)), sp["<|/image|>"]]
    start = ids.index(sp["<|image|>"])
    assert ids[start:start + 18] == img and not any(mask[start:start + 18])  # user media: context only
    a0 = ids.index(sp["<|audio|>"])
    assert all(mask[a0:ids.index(sp[END])])  # the assistant's speech and its text are targets
    text_only = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ?\n").with_special_tokens(CHAT_TOKENS)
    with pytest.raises(GptlabError, match="reads text only: it cannot take image input"):
        render_ids(text_only, msgs)


def test_split_reply_and_streamed_audio(omni, digits, speech):
    sp = omni.special_tokens
    image_ids = omni.encode_media("image", digits[0][1])
    audio_ids = omni.encode_media("audio", speech["six"])
    ids = [*omni.encode("six "), *image_ids, *audio_ids, *omni.encode("done")]
    parts = split_reply(omni, ids)
    assert [p["type"] for p in parts] == ["text", "image", "audio", "text"]
    assert parts[0]["text"] == "six " and parts[3]["text"] == "done"
    np.testing.assert_allclose(parts[1]["image"], omni.decode_media("image", image_ids[1:-1]))
    assert parts[2]["codes"] == len(audio_ids) - 2
    chunker = AudioChunker(omni, chunk=10)
    chunks = [c for t in audio_ids[1:-1] if (c := chunker.push(t)) is not None] + [chunker.finish()]
    assert len(chunks) >= 3 and abs(sum(map(len, chunks)) - len(parts[2]["audio"])) <= 320 * 2


def test_the_generator_keeps_spans_well_formed(omni):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=omni.vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=32))
    with torch.no_grad():  # all logits 0: uniform over whatever is allowed, so the grammar alone keeps order
        model.lm_head.weight.mul_(0)
    gen = Generator(model, omni)
    prompt = render_ids(omni, [{"role": "user", "content": "draw"}])[0]
    V = omni.text.vocab_size
    for mods in [(), ("text",), ("image",)]:
        p = SamplingParams(max_new_tokens=100, temperature=1.0, seed=3, modalities=mods, ignore_eos=True)
        ids = gen.generate([prompt], p)[0].token_ids
        grammar = SpanGrammar(omni, [prompt])
        for t in ids:  # every token was allowed where it was drawn
            assert grammar.allowed(0)[t], (mods, t)
            grammar.push([t])
        opens = [i for i, t in enumerate(ids) if t == omni.markers["<|image|>"]]
        for o in opens:
            if o + 17 < len(ids):
                assert all(t in omni.code_range("image") for t in ids[o + 1:o + 17])
                assert ids[o + 17] == omni.markers["<|/image|>"]
        if mods == ("text",):
            assert all(t < V for t in ids)
        if mods == ("image",):
            assert omni.markers["<|audio|>"] not in ids


# --- media, corpus ----------------------------------------------------------------------------------
def test_media_parts_from_files_data_urls_and_bad_input(tmp_path, digits, speech):
    (tmp_path / "a.png").write_bytes(png_bytes(digits[0][0]))
    (tmp_path / "q.wav").write_bytes(wav_bytes(speech["seven"]))
    part = load_part({"type": "image", "path": "a.png"}, "row 1", tmp_path)
    assert part["image"].shape == (8, 8)
    url = "data:image/png;base64," + base64.b64encode(png_bytes(digits[0][0])).decode()
    assert np.array_equal(load_part({"type": "image_url", "image_url": {"url": url}}, "m")["image"], part["image"])
    audio = load_part({"type": "input_audio", "input_audio": {"data": base64.b64encode(wav_bytes(speech["seven"])).decode(),
                                                               "format": "wav"}}, "m")["audio"]
    assert abs(len(audio) - len(speech["seven"])) < 10
    for bad, msg in [({"type": "image_url", "image_url": {"url": "http://x/a.png"}}, "only data: URLs"),
                     ({"type": "image", "path": "missing.png"}, "row 1: image file not found"),
                     ({"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}, "not valid base64"),
                     ({"type": "image", "path": "q.wav"}, "not a readable image"),
                     ({"type": "video", "path": "a.mp4"}, "unknown content part type 'video'")]:
        with pytest.raises(GptlabError, match=msg):
            load_part(bad, "row 1", tmp_path)


def test_the_corpus_is_deterministic_and_holds_out_images_and_a_voice(tmp_path):
    a = build_corpus(tmp_path / "a", per_task=4, test_per_task=2, image_codes=32, audio_codes=32, quiet=True)
    build_corpus(tmp_path / "b", per_task=4, test_per_task=2, image_codes=32, audio_codes=32, quiet=True)
    assert (tmp_path / "a" / "train.jsonl").read_text() == (tmp_path / "b" / "train.jsonl").read_text()
    assert a["test_voice"] == TEST_VOICE and TEST_VOICE not in a["train_voices"]
    train = [json.loads(ln) for ln in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    test = [json.loads(ln) for ln in (tmp_path / "a" / "test.jsonl").read_text().splitlines()]
    assert {r["task"] for r in train} == {r["task"] for r in test} and len(train) == 24
    paths = lambda rows, kind: {p["path"] for r in rows for m in r["messages"] for p in m["content"]  # noqa: E731
                                if p["type"] == kind}
    assert not paths(train, "image") & paths(test, "image")
    assert all(p.startswith("images/test_") for p in paths(test, "image"))
    tok = load_tokenizer(tmp_path / "a")
    assert isinstance(tok, OmniTokenizer) and "\n" in tok.text.chars and tok.vocab_size == a["tokenizers"]["vocab_size"]
    with pytest.raises(GptlabError, match="not empty"):
        build_corpus(tmp_path / "a", per_task=1, test_per_task=1, quiet=True)


def test_tokenizer_cli_and_prepare_read_the_omni_corpus(tmp_path, capsys):
    from gptlab.cli import main as cli_main
    from gptlab.data.loader import TokenData
    from gptlab.data.prepare import prepare

    d = tmp_path / "c"
    build_corpus(d, per_task=2, test_per_task=1, image_codes=16, audio_codes=16, quiet=True)
    for kind, src, extra in [("image", d / "images", ["--codes", "16"]), ("audio", d / "audio", ["--codes", "16"]),
                             ("omni", d / "train.jsonl", ["--image", str(tmp_path / "image.json"),
                                                          "--audio", str(tmp_path / "audio.json")])]:
        assert cli_main(["tokenizer", "train", str(src), "--kind", kind, "--out", str(tmp_path / f"{kind}.json"), *extra]) == 0
    omni = load_tokenizer(tmp_path / "omni.json")
    assert isinstance(omni, OmniTokenizer) and omni.codecs["image"].n_codes == 16 and omni.codecs["audio"].n_codes == 16
    assert omni.vocab_size == load_tokenizer(d).vocab_size  # the same layout omni-data builds
    info = prepare(str(d / "train.jsonl"), str(tmp_path / "shards"), tokenizer=str(d / "tokenizer.gptlab.json"),
                   val_fraction=0.2, progress=False)
    assert info["n_documents"] == 12 and info["vocab_size"] == omni.vocab_size
    data = TokenData(tmp_path / "shards")
    x, _ = data.windows(np.array([0]), 64, "train")
    assert int(x.max()) < omni.vocab_size and (x >= omni.code_range("image").start).any()  # media codes in the stream
    capsys.readouterr()
    assert cli_main(["tokenizer", "train", str(tmp_path / "nothing"), "--kind", "image", "--out", str(tmp_path / "x.json")]) == 2
    assert "not found" in capsys.readouterr().err


def _hf_layout(rows: list[dict], base) -> dict:
    """The corpus's JSONL rows in TRL's vision layout: parts {"type": "image"} / {"type": "audio"} as
    placeholders, the media themselves as file bytes in `images` / `audios` columns."""
    cols = {"messages": [], "images": [], "audios": []}
    for r in rows:
        msgs, ims, auds = [], [], []
        for m in r["messages"]:
            parts = []
            for p in m["content"]:
                if p["type"] == "text":
                    parts.append({"type": "text", "text": p["text"]})
                else:
                    (ims if p["type"] == "image" else auds).append({"bytes": (base / p["path"]).read_bytes(), "path": None})
                    parts.append({"type": p["type"], "text": None})
            msgs.append({"role": m["role"], "content": parts})
        cols["messages"].append(msgs)
        cols["images"].append(ims)
        cols["audios"].append(auds)
    return cols


def test_hugging_face_datasets_with_image_and_audio_columns_read_like_the_jsonl(tmp_path):
    datasets = pytest.importorskip("datasets")
    from gptlab.align.data import load_sft_examples
    from gptlab.data.prepare import prepare

    d = tmp_path / "c"
    build_corpus(d, per_task=2, test_per_task=1, image_codes=16, audio_codes=16, quiet=True)
    rows = [json.loads(ln) for ln in (d / "train.jsonl").read_text().splitlines()]
    features = datasets.Features({
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(
            {"type": datasets.Value("string"), "text": datasets.Value("string")})}),
        "images": datasets.List(datasets.Image()), "audios": datasets.List(datasets.Audio())})
    # built with the media as plain {bytes, path} structs, then cast: writing an Audio column through
    # datasets' encoder needs torchcodec, reading one undecoded (as gptlab does) does not
    media = datasets.List({"bytes": datasets.Value("binary"), "path": datasets.Value("string")})
    plain = datasets.Features({**features, "images": media, "audios": media})
    ds = datasets.Dataset.from_dict(_hf_layout(rows, d), features=plain).cast(features)
    assert isinstance(ds.features["audios"].feature, datasets.Audio)
    ds.save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hfdict"))

    want = load_sft_examples(str(d / "train.jsonl"))
    for src in (tmp_path / "hf", tmp_path / "hfdict"):
        got = load_sft_examples(str(src))
        assert len(got) == len(want) == 12
        for a, b in zip(got, want):  # the same arrays, decoded by Pillow / soundfile from the column bytes
            for ma, mb in zip(a, b):
                assert ma["role"] == mb["role"] and len(ma["content"]) == len(mb["content"])
                for pa, pb in zip(ma["content"], mb["content"]):
                    assert pa["type"] == pb["type"]
                    key = pa["type"]
                    assert np.array_equal(pa[key], pb[key]) if key != "text" else pa["text"] == pb["text"]
    tok = str(d / "tokenizer.gptlab.json")
    a = prepare(str(tmp_path / "hf"), str(tmp_path / "s1"), tokenizer=tok, val_fraction=0.2, progress=False)
    b = prepare(str(d / "train.jsonl"), str(tmp_path / "s2"), tokenizer=tok, val_fraction=0.2, progress=False)
    assert a["n_tokens"] == b["n_tokens"] and a["n_documents"] == b["n_documents"]
    shards = sorted(f.name for f in (tmp_path / "s2").iterdir() if f.suffix != ".json" and not f.name.startswith("."))
    assert shards and all((tmp_path / "s1" / f).read_bytes() == (tmp_path / "s2" / f).read_bytes() for f in shards)

    cols = _hf_layout(rows[:1], d)
    cols["images"][0] = []  # a placeholder without its image: one line naming the row
    datasets.Dataset.from_dict(cols, features=plain).cast(features).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(GptlabError, match=r"bad row 1 message 0 part 1: an image placeholder"):
        load_sft_examples(str(tmp_path / "bad"))
    with pytest.raises(GptlabError, match="no 'test' split"):
        from gptlab.data.hf_rows import read_hf_rows
        read_hf_rows(str(tmp_path / "hfdict"), split="test")


def test_a_new_omni_model_starts_its_code_embeddings_from_the_codebooks(omni):
    from gptlab.stage.models import random_model

    model = random_model("small-4x128", omni, {"n_layer": 1, "block_size": 64})
    for modality in ("image", "audio"):
        span = omni.code_range(modality)
        e = model.wte.weight[span.start:span.stop].detach()
        v = omni.codecs[modality].code_vectors()
        v = (v - v.mean(0)) / (v.std(0) + 1e-6)
        # distances between embeddings follow distances between what the codes stand for
        de, dv = torch.cdist(e, e).flatten(), torch.cdist(v, v).flatten()
        assert torch.corrcoef(torch.stack([de, dv]))[0, 1] > 0.8
        assert abs(float(e.std()) - model.cfg.init_std) < 0.002
    text = model.wte.weight[: omni.text.vocab_size].detach()
    assert abs(float(text.std()) - model.cfg.init_std) < 0.005  # text rows keep the random init
