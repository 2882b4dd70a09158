"""Hugging Face interop: import HF GPT-2/GPT-1 checkpoints, export runs back, all offline.

Every HF model here is a tiny random one built with transformers and saved to a temp dir; parameters
(LayerNorms and biases included) are perturbed away from their init so a wrong mapping cannot hide.
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import shutil
import threading
from pathlib import Path

import pytest
import torch

from gptlab.errors import GptlabError
from gptlab.interop import export_hf, import_hf
from gptlab.interop.cli import add_convert_parser, cmd_convert
from gptlab.model import GPT, GPTConfig
from gptlab.run import load_run, write_run_config
from gptlab.generate import Generator, SamplingParams
from gptlab.tokenizer import EOT, BPETokenizer, CharTokenizer, gpt2_tokenizer, train_bpe
from gptlab.tokenizer.bpe import GPT2_PATTERN, gpt2_data_dir
from gptlab.run.format import MODEL_FILE, save_model

transformers = pytest.importorskip("transformers")

SAMPLE = ("Hello world! It's   three  spaces\t\ttabs\r\nCRLF \u00a0nbsp\u3000ideographic  \n\n\n"
          "中文测试：你好，世界！ 🎉🚀 👨\u200d👩\u200d👧 café naïve e\u0301 12345 3.14 $100 ...   trailing   ")


def _perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _write_run(path: Path, cfg: GPTConfig, tok, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    m = GPT(cfg)
    _perturb(m, seed)
    write_run_config(path, cfg, tok, stage="test")
    save_model(m, path / MODEL_FILE)
    return m.eval()


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out[0]


def _corpus(seed: int, lines: int) -> str:
    rng = random.Random(seed)
    syl = ["ka", "lo", "mi", "tre", "shu", "an", "der", "ing", "the", "ön", "straße", "你好", "世界", "é", "ü", "'s"]
    words = ["".join(rng.choice(syl) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice([".", "!", "?", ","])
                     for _ in range(lines))


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def gpt2_hf(tmp_path_factory):
    """A random HF GPT-2 with the real GPT-2 vocab, saved as safetensors and as pytorch_model.bin."""
    root = tmp_path_factory.mktemp("hf_gpt2")
    d = gpt2_data_dir()
    cls = transformers.GPT2TokenizerFast
    if "vocab" in inspect.signature(cls.__init__).parameters:  # transformers 5 (4 takes vocab_file/merges_file)
        hf_tok = cls(vocab=str(d / "encoder.json"), merges=str(d / "vocab.bpe"))
    else:
        hf_tok = cls(vocab_file=str(d / "encoder.json"), merges_file=str(d / "vocab.bpe"))
    assert len(hf_tok) == 50257
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50257, n_positions=128, n_embd=64, n_layer=2,
                                                              n_head=4))
    _perturb(hf, 1)
    hf.eval()
    hf.save_pretrained(root / "st")
    # transformers 5 always writes safetensors. The legacy pytorch_model.bin is a torch.save'd state dict, here
    # like the hub's gpt2: no "transformer." prefix, causal-mask buffers; plus lm_head.weight sharing wte's storage.
    (root / "bin").mkdir()
    shutil.copy(root / "st" / "config.json", root / "bin")
    legacy = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    for i in range(2):
        legacy[f"h.{i}.attn.bias"] = torch.tril(torch.ones(128, 128)).view(1, 1, 128, 128)
        legacy[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(legacy, root / "bin" / "pytorch_model.bin")
    for sub in ("st", "bin"):
        hf_tok.save_pretrained(root / sub)
    assert (root / "st" / "model.safetensors").is_file() and (root / "bin" / "pytorch_model.bin").is_file()
    return hf, root


@pytest.fixture(scope="module")
def gpt2_run(gpt2_hf, tmp_path_factory):
    return import_hf(gpt2_hf[1] / "st", tmp_path_factory.mktemp("runs") / "gpt2")


@pytest.fixture(scope="module")
def trained_bpe():
    """A gptlab-trained BPE (its single bytes ranked by byte value, unlike GPT-2) plus a second special."""
    tok = train_bpe(_corpus(0, 400), 300, progress=False)
    n = len(tok.mergeable_ranks)
    assert n > 256 + 250
    return BPETokenizer(tok.mergeable_ranks, GPT2_PATTERN, {EOT: n, "<|im_start|>": n + 1}, name="trained")


# ---------------------------------------------------------------------------------------------- GPT-2
def test_gpt2_import_safetensors_and_bin_match_hf_logits(gpt2_hf, gpt2_run, tmp_path):
    hf, root = gpt2_hf
    x = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(0))
    ref = _logits(hf, x)
    for run_dir in (gpt2_run, import_hf(root / "bin", tmp_path / "from_bin")):
        run = load_run(run_dir)
        cfg = run.model.cfg
        assert (cfg.norm, cfg.activation, cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.d_ff) == ("pre", "gelu_tanh", 2, 64, 128, 256)
        assert cfg.tie_embeddings  # the .bin stores lm_head.weight too, equal to wte: still tied
        torch.testing.assert_close(_logits(run.model, x), ref, atol=1e-4, rtol=1e-4)
        assert run.config["stage"] == "import" and run.config["source"]["model_type"] == "gpt2"
    tok = load_run(gpt2_run).tokenizer  # read from the HF tokenizer.json
    assert tok.mergeable_ranks == gpt2_tokenizer().mergeable_ranks and tok.special_tokens == {EOT: 50256}


def test_gpt2_export_loads_in_transformers_with_same_logits_and_ids(gpt2_run, tmp_path):
    out = export_hf(gpt2_run, tmp_path / "hf")
    run = load_run(gpt2_run)
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    x = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(hf, x), _logits(run.model, x), atol=1e-4, rtol=1e-4)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["activation_function"] == "gelu_new"
    assert cfg["eos_token_id"] == cfg["bos_token_id"] == 50256
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": 50256, "max_length": 128}

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = run.tokenizer.encode(SAMPLE)
    assert hf_tok.encode(SAMPLE) == ids and len(ids) > 40
    assert hf_tok.decode(ids) == SAMPLE
    assert hf_tok.eos_token_id == 50256 and hf_tok.model_max_length == 128
    # our own vocab.json + merges.txt import back to exactly the GPT-2 tokenizer
    back = load_run(import_hf(out, tmp_path / "again"))
    assert back.tokenizer.mergeable_ranks == gpt2_tokenizer().mergeable_ranks
    torch.testing.assert_close(_logits(back.model, x), _logits(run.model, x), atol=0, rtol=0)


def test_greedy_generation_matches_hf_generate(gpt2_hf, gpt2_run):
    hf = gpt2_hf[0]
    run = load_run(gpt2_run)
    ids = torch.tensor([run.tokenizer.encode("The meaning of life is")])
    # the KV-cache generator (with its fp32 CPU weight re-layout) against HF's generate on the same weights
    out = Generator(run.model, run.tokenizer).generate([ids[0].tolist()], SamplingParams(
        max_new_tokens=32, temperature=0, ignore_eos=True))[0]
    theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                         eos_token_id=None, pad_token_id=50256)
    assert theirs.shape == (1, ids.shape[1] + 32)
    assert len(set(out.token_ids)) > 1  # not one token repeated
    assert out.token_ids == theirs[0, ids.shape[1]:].tolist()


def test_untied_lm_head_is_kept(tmp_path, trained_bpe):
    torch.manual_seed(2)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=600, n_positions=32, n_embd=32, n_layer=1, n_head=2, n_inner=48, activation_function="gelu",
        tie_word_embeddings=False, bos_token_id=trained_bpe.eot_id, eos_token_id=trained_bpe.eot_id))
    _perturb(hf, 3)
    hf.eval().save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()  # sharded
    trained_bpe.save(tmp_path / "tok.json")
    run = load_run(import_hf(tmp_path / "hf", tmp_path / "run", tokenizer=str(tmp_path / "tok.json")))
    assert not run.model.cfg.tie_embeddings and run.model.cfg.d_ff == 48 and run.model.cfg.activation == "gelu"
    x = torch.randint(0, 600, (2, 32))
    torch.testing.assert_close(_logits(run.model, x), _logits(hf, x), atol=1e-4, rtol=1e-4)
    out = export_hf(tmp_path / "run", tmp_path / "back")
    hf2 = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(hf2, x), _logits(hf, x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- trained BPE merges
def test_trained_bpe_merges_reproduce_ids_in_hf(trained_bpe, tmp_path):
    cfg = GPTConfig(vocab_size=trained_bpe.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32)
    _write_run(tmp_path / "run", cfg, trained_bpe)
    out = export_hf(tmp_path / "run", tmp_path / "hf")
    merges = (out / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) - 1 == len(trained_bpe.mergeable_ranks) - 256
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    held_out = [_corpus(7, 60), SAMPLE, "straßeing the 你好世界 kalo'S 🙂🙂 trétre\n\n  x"]
    for text in held_out:
        ids = trained_bpe.encode(text)
        assert hf_tok.encode(text) == ids
        assert hf_tok.decode(ids) == text
    # both specials are added tokens that HF does not split
    text = "<|im_start|>kalo mi<|endoftext|>"
    assert hf_tok.encode(text) == trained_bpe.encode(text, allowed_special="all")
    assert hf_tok.convert_tokens_to_ids("<|im_start|>") == trained_bpe.vocab_size - 1
    # and the exported files import back to the same tokenizer
    back = load_run(import_hf(out, tmp_path / "again")).tokenizer
    assert back.mergeable_ranks == trained_bpe.mergeable_ranks and back.special_tokens == trained_bpe.special_tokens


# ---------------------------------------------------------------------------------------------- GPT-1
def test_gpt1_import_and_export(tmp_path, trained_bpe):
    torch.manual_seed(4)
    hf = transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(
        vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4, layer_norm_epsilon=1e-6))
    _perturb(hf, 5)
    hf.eval().save_pretrained(tmp_path / "hf1")
    char = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .,\n")
    char.save(tmp_path / "char.json")
    with pytest.raises(GptlabError, match="not byte-level.*--tokenizer"):
        import_hf(tmp_path / "hf1", tmp_path / "nope")
    run = load_run(import_hf(tmp_path / "hf1", tmp_path / "run1", tokenizer=str(tmp_path / "char.json")))
    cfg = run.model.cfg
    # OpenAIGPT's afn "gelu" is the tanh approximation (transformers' ACT_FNS maps it to gelu_new)
    assert (cfg.norm, cfg.activation, cfg.ln_eps, cfg.block_size) == ("post", "gelu_tanh", 1e-6, 64)
    x = torch.randint(0, 300, (2, 64))
    torch.testing.assert_close(_logits(run.model, x), _logits(hf, x), atol=1e-4, rtol=1e-4)

    # a gptlab post-LN model (BPE tokenizer) exports to OpenAIGPTLMHeadModel; an exact-erf one is refused
    cfg = GPTConfig(vocab_size=trained_bpe.vocab_size + 5, block_size=48, n_layer=2, n_head=4, n_embd=64, norm="post",
                    activation="gelu", scaled_residual_init=False)
    _write_run(tmp_path / "run_erf", cfg, trained_bpe)
    with pytest.raises(GptlabError, match="tanh approximation"):
        export_hf(tmp_path / "run_erf", tmp_path / "hf_erf")
    cfg.activation = "gelu_tanh"
    m = _write_run(tmp_path / "run_post", cfg, trained_bpe, seed=6)
    out = export_hf(tmp_path / "run_post", tmp_path / "hf_post")
    assert json.loads((out / "config.json").read_text())["afn"] == "gelu"
    hf_post = transformers.OpenAIGPTLMHeadModel.from_pretrained(out).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 48))
    torch.testing.assert_close(_logits(hf_post, x), _logits(m, x), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ bad input
def _cli(*argv: str) -> None:
    p = argparse.ArgumentParser(prog="gptlab")
    add_convert_parser(p.add_subparsers(dest="cmd", required=True))
    cmd_convert(p.parse_args(["convert", *argv]))


def test_bad_input_fails_with_one_line_errors(gpt2_hf, gpt2_run, tmp_path):
    src = gpt2_hf[1] / "st"

    def hf_dir(name: str, config: dict | None = None, weights: bytes | None = None, wname: str = "model.safetensors"):
        d = tmp_path / name
        d.mkdir()
        shutil.copy(src / "tokenizer.json", d)
        cfg = json.loads((src / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
        if weights is not None:
            (d / wname).write_bytes(weights)
        return d

    cases = [
        (tmp_path / "does_not_exist", "directory not found"),
        (hf_dir("noweights"), "no model weights"),
        (hf_dir("llama", {"model_type": "llama"}), "unsupported model_type 'llama'"),
        (hf_dir("relu", {"activation_function": "relu"}), "activation 'relu' is not supported"),
        (hf_dir("corrupt", weights=b"\x00" * 64), "corrupt"),
        (hf_dir("corrupt_bin", weights=b"PK\x03\x04 not a zip", wname="pytorch_model.bin"), "corrupt"),
        (hf_dir("shape", {"n_embd": 128}, weights=(src / "model.safetensors").read_bytes()), "has shape"),
        (hf_dir("untied", {"tie_word_embeddings": False}, weights=(src / "model.safetensors").read_bytes()),
         "lm_head.weight is missing"),
    ]
    for d, msg in cases:
        with pytest.raises(GptlabError, match=msg) as e:
            _cli("--from-hf", str(d), str(tmp_path / "out"))
        assert "\n" not in str(e.value)
        assert not (tmp_path / "out").exists()  # nothing half-written
    with pytest.raises(GptlabError, match="already exists"):
        import_hf(src, gpt2_run)

    char = CharTokenizer.from_text("abc ")
    _write_run(tmp_path / "char_run", GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=1, n_embd=8), char)
    with pytest.raises(GptlabError, match="cannot export a char tokenizer"):
        _cli("--to-hf", str(tmp_path / "char_run"), str(tmp_path / "hf_out"))
    local = GPTConfig(vocab_size=300, block_size=8, n_layer=2, n_head=1, n_embd=8, attention=("dense", "local"))
    _write_run(tmp_path / "local_run", local, CharTokenizer.from_text("ab"))  # refused before the tokenizer
    with pytest.raises(GptlabError, match="local attention"):
        _cli("--to-hf", str(tmp_path / "local_run"), str(tmp_path / "hf_out"))
    assert not (tmp_path / "hf_out").exists() and not list(tmp_path.glob(".hf_out.*"))


# ----------------------------------------------------------------------------------------- chat template
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                  "{% if add_generation_prompt %}Assistant:{% endif %}")


def test_imported_chat_template_renders_like_transformers_and_serves(gpt2_hf, tmp_path):
    """An HF model without gptlab's chat tokens keeps its chat_template through convert --from-hf (and back
    out through --to-hf); gptlab serve chats with it, tokenizing prompts as apply_chat_template does."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from gptlab.chat.jinja import TEMPLATE_FILE, JinjaChat
    from gptlab.serve.app import create_app

    src = tmp_path / "hf"
    shutil.copytree(gpt2_hf[1] / "st", src)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": PLAIN_TEMPLATE}))
    hf_tok = transformers.AutoTokenizer.from_pretrained(src)
    run = import_hf(src, tmp_path / "run")
    assert (run / TEMPLATE_FILE).read_text() == PLAIN_TEMPLATE
    tok = load_run(run).tokenizer
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, friend"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Weather?"}]
    ref = hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    ref = list(ref["input_ids"]) if hasattr(ref, "keys") else list(ref)  # transformers 5: a BatchEncoding
    chat = JinjaChat(PLAIN_TEMPLATE, tok)
    assert chat.render_ids(msgs) == ref
    # typed special-token text stays text (transformers would parse it as <|endoftext|>)
    sneaky = [{"role": "user", "content": "a<|endoftext|>b"}]
    assert chat.render_ids(sneaky).count(tok.eot_id) == 1
    exported = export_hf(run, tmp_path / "back")
    assert json.loads((exported / "tokenizer_config.json").read_text())["chat_template"] == PLAIN_TEMPLATE
    with TestClient(create_app(run, model_name="m")) as c:
        for _ in range(200):
            if c.get("/health").status_code == 200:
                break
            threading.Event().wait(0.05)
        r = c.post("/tokenize", json={"messages": msgs})
        assert r.json()["tokens"] == ref
        r = c.post("/v1/chat/completions", json={"model": "m", "messages": msgs, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(ref)
    with pytest.raises(GptlabError, match="does not parse"):
        create_app(run, chat_template="{% for %}")
