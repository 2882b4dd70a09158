"""LoRA / QLoRA: the layer against its formula, PEFT parity both ways (peft + transformers load what gptlab
trained; gptlab merges what peft saved), exact resume, QLoRA's frozen quantized base, bad input."""

import json
import random
from pathlib import Path

import pytest
import torch

from gptlab.align.sft import sft
from gptlab.cli import main as cli
from gptlab.compress.quant import Int8Linear, rtn_intn
from gptlab.errors import GptlabError
from gptlab.interop.hf import export_hf
from gptlab.model import GPT, preset
from gptlab.model.lora import LoRALinear, adapters_off, add_lora, merged_state
from gptlab.run import load_run, write_run_config
from gptlab.run.format import MODEL_FILE, read_safetensors, save_model
from gptlab.tokenizer import EOT, BPETokenizer, train_bpe
from gptlab.tokenizer.bpe import GPT2_PATTERN

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

FAST = dict(dtype="float32", peak_flops=1e12, log_interval=1, eval_interval=0, eval_iters=2, batch_size=4, lr=1e-2)


def _text(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "red", "blue"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(2, 6))) for _ in range(n)]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A small GPT-2-layout run with a byte-level BPE (exportable to HF), weights perturbed off init."""
    d = tmp_path_factory.mktemp("lora") / "base"
    bpe = train_bpe("\n".join(_text(0, 300)), 40, progress=False)
    tok = BPETokenizer(bpe.mergeable_ranks, GPT2_PATTERN, {EOT: len(bpe.mergeable_ranks)}, name="t")
    cfg = preset("gpt2", vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=64,
                 embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    write_run_config(d, cfg, tok, stage="pretrain")
    save_model(model, d / MODEL_FILE)
    return d


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("lora_data") / "sft.jsonl"
    rows = [{"prompt": q, "response": a} for q, a in zip(_text(1, 48), _text(2, 48))]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.fixture(scope="module")
def lora_run(base_run, sft_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora_runs") / "sft"
    sft(out, sft_data, init_from=base_run, train={**FAST, "max_iters": 10}, lora={"r": 4, "alpha": 8}, quiet=True)
    return out


def test_lora_layer_is_its_formula_and_merges_exactly():
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 20)
    m = LoRALinear(lin, r=3, alpha=6.0)
    torch.nn.init.normal_(m.lora_B)
    x = torch.randn(5, 12)
    want = x @ lin.weight.T + lin.bias + 2.0 * (x @ m.lora_A.T @ m.lora_B.T)  # scaling α/r = 2
    torch.testing.assert_close(m(x), want)
    torch.testing.assert_close(x @ (lin.weight + m.delta()).T + lin.bias, want, atol=1e-5, rtol=1e-5)
    m.enabled = False
    torch.testing.assert_close(m(x), lin(x))


def test_adapters_start_at_the_base_and_only_they_train():
    torch.manual_seed(0)
    model = GPT(preset("tiny", n_embd=32))
    x = torch.randint(0, 512, (2, 16))
    before = model(x)[0]
    add_lora(model, 4, 8.0, 0.0, ["c_attn", "c_proj", "c_fc"])
    torch.testing.assert_close(model(x)[0], before)  # B = 0
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith(("lora_A", "lora_B")) for n in trained)
    assert len(trained) == 2 * 4 * 2  # 4 layers per block × 2 blocks × (A, B)


def test_peft_loads_the_adapter_with_the_same_logits(base_run, lora_run, tmp_path):
    run = load_run(lora_run)
    cfg = json.loads((lora_run / "config.json").read_text())
    assert cfg["lora"]["token_ids"]  # SFT added the chat tokens: their rows were trained
    hf_dir = export_hf(base_run, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir)
    hf.resize_token_embeddings(run.model.cfg.vocab_size)  # as with any tokenizer that gained tokens
    pm = peft.PeftModel.from_pretrained(hf, lora_run / "adapter").eval()
    x = torch.randint(0, run.model.cfg.vocab_size, (3, 24))
    x[:, :4] = torch.tensor(cfg["lora"]["token_ids"])
    with torch.no_grad():
        ours, theirs = run.model(x)[0], pm(x).logits
        base = load_run(base_run).model(x.clamp_max(load_run(base_run).model.cfg.vocab_size - 1))[0]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert (ours[:, 4:, :base.size(-1)] - base[:, 4:]).abs().max() > 1e-2  # the adapter changed the model


def test_lora_merge_reads_an_adapter_peft_saved(base_run, tmp_path):
    hf = transformers.GPT2LMHeadModel.from_pretrained(export_hf(base_run, tmp_path / "hf"))
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=5, target_modules=["c_attn", "mlp.c_proj"],
                                                 fan_in_fan_out=True))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path / "peft")
    assert cli(["lora", "merge", str(tmp_path / "peft"), "--base", str(base_run), "--out", str(tmp_path / "merged")]) == 0
    x = torch.randint(0, hf.config.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(load_run(tmp_path / "merged").model(x)[0], pm.eval()(x).logits, atol=1e-4, rtol=1e-4)


def test_lora_merge_of_a_run_equals_its_merged_weights(base_run, lora_run, tmp_path):
    assert cli(["lora", "merge", str(lora_run), "--base", str(base_run), "--out", str(tmp_path / "m")]) == 0
    a, b = read_safetensors(lora_run / MODEL_FILE), read_safetensors(tmp_path / "m" / MODEL_FILE)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_lora_resume_continues_exactly(base_run, sft_data, tmp_path):
    train = {**FAST, "max_iters": 8, "decay_iters": 8, "checkpoint_interval": 4}  # one schedule for both
    sft(tmp_path / "straight", sft_data, init_from=base_run, train=train, lora={"r": 4}, quiet=True)
    sft(tmp_path / "cut", sft_data, init_from=base_run, train={**train, "max_iters": 4}, lora={"r": 4}, quiet=True)
    sft(tmp_path / "cut", sft_data, train={"max_iters": 8}, resume=True, quiet=True)
    for f in (MODEL_FILE, "adapter/adapter_model.safetensors"):
        a, b = read_safetensors(tmp_path / "straight" / f), read_safetensors(tmp_path / "cut" / f)
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(GptlabError, match="cannot change when resuming"):
        sft(tmp_path / "cut", sft_data, train={"max_iters": 9}, resume=True, quiet=True, lora={"r": 8})


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_qlora_keeps_the_quantized_base_frozen_and_trains_adapters(base_run, sft_data, tmp_path, bits):
    out = tmp_path / bits
    res = sft(out, sft_data, init_from=base_run, train={**FAST, "max_iters": 10}, quiet=True,
              lora={"r": 4, "quantize": bits, "group_size": 16})
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    sd = read_safetensors(ckpt / MODEL_FILE)
    base = load_run(base_run).model
    lin = base.h[0].attn.c_attn
    q = Int8Linear.from_linear(lin) if bits == "int8" else rtn_intn(lin, 4, 16)
    for k, v in q.state_dict().items():  # the checkpoint's base is the base quantized, untouched by training
        assert torch.equal(sd[f"h.0.attn.c_attn.base.{k}"], v), k
    opt = read_safetensors(ckpt / "optimizer.safetensors")
    n_trained = sum(1 for k in sd if k.endswith(("lora_A", "lora_B", ".rows")))
    assert len([k for k in opt if k.endswith("exp_avg")]) == n_trained  # Adam state only for what trains
    recs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert recs[-1]["loss"] < recs[0]["loss"] and res["step"] == 10
    import resource  # the logged peak is this process's peak resident set (KiB on Linux), never above it

    assert 0 < recs[-1]["peak_mem_mb"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 + 1
    # the merged export is the dequantized base + (α/r)·B·A
    merged = read_safetensors(out / MODEL_FILE)
    a, b = sd["h.0.attn.c_attn.lora_A"], sd["h.0.attn.c_attn.lora_B"]
    torch.testing.assert_close(merged["h.0.attn.c_attn.weight"], q.dequantize() + (16 / 4) * b @ a)


def test_adapters_off_is_the_base(base_run):
    model = load_run(base_run).model
    x = torch.randint(0, model.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        want = model(x)[0]
        add_lora(model, 2, 4.0, 0.0, ["c_fc"])
        for m in model.modules():
            if isinstance(m, LoRALinear):
                torch.nn.init.normal_(m.lora_B)
        assert not torch.allclose(model(x)[0], want)
        with adapters_off(model):
            torch.testing.assert_close(model(x)[0], want)
        merged = merged_state(model)
        plain = GPT(model.cfg)
        plain.load_state_dict(merged, strict=False)
        torch.testing.assert_close(plain.eval()(x)[0], model(x)[0], atol=1e-5, rtol=1e-5)


def test_bad_lora_settings_are_one_line_errors(base_run, sft_data, tmp_path, capsys):
    cases = [(["--lora.r", "4", "--lora.targets", "wte"], "no block layer"),
             (["--lora.r", "-1"], "lora.r must be"),
             (["--lora.quantize", "int4"], "needs adapters"),
             (["--lora.r", "4", "--lora.quantize", "nf3"], "lora.quantize must be")]
    for extra, msg in cases:
        assert cli(["sft", "--from", str(base_run), "--data", str(sft_data), "--out", str(tmp_path / "x"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and msg in err and len(err.splitlines()) == 1
        assert not (tmp_path / "x").exists()
    assert cli(["lora", "merge", str(tmp_path), "--base", str(base_run), "--out", str(tmp_path / "m")]) == 2
    assert "not a LoRA adapter directory" in capsys.readouterr().err


# --- PPO: actor and critic adapters, the reference as the actor's frozen base ----------------------------
@pytest.fixture(scope="module")
def ppo_sft(tmp_path_factory):
    from test_align_ppo import _tok

    d = tmp_path_factory.mktemp("ppo_sft")
    tok = _tok()
    torch.manual_seed(0)
    m = GPT(preset("tiny", vocab_size=tok.vocab_size, block_size=48))
    write_run_config(d, m.cfg, tok, stage="sft")
    save_model(m, d / MODEL_FILE)
    return d


def test_ppo_with_lora_learns_and_resumes_exactly(ppo_sft, tmp_path):
    from gptlab.align.ppo import ppo
    from test_align_ppo import PROMPTS, _cfg, frac_a

    lora = {"r": 8, "alpha": 16}
    r = ppo(tmp_path / "learn", PROMPTS, actor_from=ppo_sft, reward_fn=frac_a, quiet=True, lora=lora,
            config=_cfg(iterations=12, rollout_prompts=32, eval_samples=4, actor_lr=3e-3, critic_lr=3e-3))
    assert abs(r["kl_before"]) < 1e-6  # adapters off = the reference
    assert r["reward_after"] - r["reward_before"] >= 0.2 and 0 < r["kl_after"] < 8
    assert load_run(tmp_path / "learn" / "critic").model.cfg.head == "scalar"
    assert (tmp_path / "learn" / "adapter" / "adapter_model.safetensors").is_file()

    cfg = _cfg(eval_prompts=4)
    ppo(tmp_path / "full", PROMPTS, actor_from=ppo_sft, reward_fn=frac_a, quiet=True, config=cfg, lora=lora)
    ppo(tmp_path / "part", PROMPTS, actor_from=ppo_sft, reward_fn=frac_a, quiet=True, config={**cfg, "iterations": 1},
        lora=lora)
    ppo(tmp_path / "part", PROMPTS, actor_from=ppo_sft, reward_fn=frac_a, quiet=True, config={"iterations": 2}, resume=True)
    a, b = read_safetensors(tmp_path / "full" / MODEL_FILE), read_safetensors(tmp_path / "part" / MODEL_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- serving several adapters over one base --------------------------------------------------------------
def _adapter(model, d: Path, seed: int, r: int, targets) -> Path:
    """A random adapter over `model` (a copy), written in PEFT's format -> its dir; and the merged model."""
    import copy

    from gptlab.model.lora import adapter_state
    from gptlab.run.adapter import save_adapter

    m = copy.deepcopy(model)
    torch.manual_seed(seed)
    add_lora(m, r, 2.0 * r, 0.0, targets)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_B.normal_(0, 0.2)
    save_adapter(d, adapter_state(m), {"r": r, "alpha": 2.0 * r, "dropout": 0.0, "targets": ",".join(targets)}, False)
    plain = GPT(model.cfg)
    plain.load_state_dict(merged_state(m), strict=False)
    return d, plain.eval()


def test_rows_of_different_adapters_in_one_batch_equal_each_alone(base_run, tmp_path):
    from gptlab.serve.adapters import install_adapters

    base = load_run(base_run).model
    (da, ma), (db, mb) = (_adapter(base, tmp_path / "a", 1, 4, ["c_attn", "c_fc"]),
                          _adapter(base, tmp_path / "b", 2, 2, ["mlp.c_proj"]))
    served = load_run(base_run).model
    bank = install_adapters(served, [("a", da), ("b", db)])
    x = torch.randint(0, base.cfg.vocab_size, (4, 10))
    bank.route([0, 1, 2, 1])
    with torch.no_grad():
        got = served(x)[0]
        want = torch.stack([base(x[:1])[0][0], ma(x[1:2])[0][0], mb(x[2:3])[0][0], ma(x[3:])[0][0]])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        bank.route([2, 2, 2, 2])  # one adapter for all rows: the plain-matmul path
        torch.testing.assert_close(served(x)[0], mb(x)[0], atol=1e-5, rtol=1e-5)


def test_serve_lora_chooses_the_adapter_by_model_name(tmp_path):
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from concurrent.futures import ThreadPoolExecutor

    from gptlab.chat.template import ensure_chat_tokens
    from gptlab.generate import Generator, SamplingParams
    from gptlab.model import GPTConfig
    from gptlab.tokenizer import gpt2_tokenizer
    from test_serve import KEY, Server

    tok = ensure_chat_tokens(gpt2_tokenizer())
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=32)).eval()
    write_run_config(tmp_path / "base", model.cfg, tok)
    save_model(model, tmp_path / "base" / MODEL_FILE)
    (da, ma), (db, mb) = (_adapter(model, tmp_path / "a", 1, 4, ["c_attn", "c_proj", "c_fc"]),
                          _adapter(model, tmp_path / "b", 2, 8, ["c_fc"]))
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    want = {name: Generator(m, tok).generate(["Once upon a time"], greedy)[0].text
            for name, m in (("tiny", model), ("a", ma), ("b", mb))}
    assert len(set(want.values())) == 3  # the adapters change what the model says
    srv = Server(tmp_path / "base", tmp_path / "log", "--lora", f"a={da}", "--lora", f"b={db}").wait_healthy()
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in c.models.list().data] == ["tiny", "a", "b"]

        def ask(name):
            r = c.completions.create(model=name, prompt="Once upon a time", max_tokens=12, temperature=0)
            return r.model, r.choices[0].text

        with ThreadPoolExecutor(6) as pool:  # the three models' rows share batches
            got = list(pool.map(ask, ["a", "tiny", "b", "b", "a", "tiny"]))
        assert got == [(n, want[n]) for n in ["a", "tiny", "b", "b", "a", "tiny"]]
        with pytest.raises(openai.NotFoundError, match="'tiny', 'a', 'b'"):
            c.completions.create(model="c", prompt="x", max_tokens=2)
        # the prefix cache keeps each adapter's KV apart: adapter a's prompt + reply (two 16-token blocks and
        # more) must not serve the base when it is sent the same text next
        long = "It was the best of times, it was the worst of times, it was the age of wisdom"
        reply = c.completions.create(model="a", prompt=long, max_tokens=16, temperature=0).choices[0].text
        follow = long + reply + " and"
        got = c.completions.create(model="tiny", prompt=follow, max_tokens=8, temperature=0).choices[0].text
        assert got == Generator(model, tok).generate([follow], SamplingParams(max_new_tokens=8, temperature=0))[0].text
    finally:
        srv.stop()


def test_continued_pretraining_and_finetuning_train_only_adapters_rows_and_head(tmp_path):
    from gptlab.data.prepare import prepare
    from gptlab.finetune.train import finetune

    (tmp_path / "corpus.txt").write_text("the cat sat on the mat. the dog ran far away.\n" * 60)
    prepare(str(tmp_path / "corpus.txt"), str(tmp_path / "data"), tokenizer="char", val_fraction=0.1, progress=False)
    common = ["--data", str(tmp_path / "data"), "--train.max_iters", "4", "--train.batch_size", "4",
              "--train.block_size", "32", "--train.dtype", "float32", "--train.eval_interval", "0", "--train.lr", "1e-2"]
    assert cli(["pretrain", "--out", str(tmp_path / "base"), "--preset", "tiny", "--model.block_size", "32", *common]) == 0
    assert cli(["pretrain", "--from", str(tmp_path / "base"), "--out", str(tmp_path / "cont"), "--lora.r", "4",
                "--lora.targets", "c_attn,mlp.c_proj", *common]) == 0
    base, cont = read_safetensors(tmp_path / "base" / MODEL_FILE), read_safetensors(tmp_path / "cont" / MODEL_FILE)
    assert base.keys() == cont.keys()
    changed = {k for k in base if not torch.equal(base[k], cont[k])}
    assert changed == {f"h.{i}.{n}.weight" for i in range(2) for n in ("attn.c_attn", "mlp.c_proj")}
    cfg = json.loads((tmp_path / "cont" / "config.json").read_text())
    assert cfg["init"]["from"] == str((tmp_path / "base").resolve()) and cfg["lora"]["r"] == 4

    rng = random.Random(5)
    texts = [" ".join(rng.choice(["the", "cat", "dog", "sat", "ran", "on", "mat"]) for _ in range(4)) for _ in range(40)]
    rows = [{"text": t, "label": "cat" if "cat" in t else "dog"} for t in texts]
    (tmp_path / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ft"
    finetune(out, tmp_path / "cls.jsonl", init_from=tmp_path / "base", quiet=True, lora={"r": 4},
             train_layers=({"max_iters": 4, "batch_size": 4, "dtype": "float32", "eval_interval": 0},))
    saved = json.loads((out / "config.json").read_text())
    assert len(saved["lora"]["token_ids"]) == 3  # GPT-1's start, delimiter and extract tokens
    ft = read_safetensors(out / MODEL_FILE)
    assert torch.equal(ft["h.0.ln_1.weight"], base["h.0.ln_1.weight"])  # frozen
    ids = saved["lora"]["token_ids"]
    assert torch.equal(ft["wte.weight"][:len(base["wte.weight"])], base["wte.weight"])  # old rows frozen
    assert ft["wte.weight"].shape[0] == len(base["wte.weight"]) + 3 and ids == [19, 20, 21]
    assert (out / "adapter" / "head.safetensors").is_file()  # the classifier head, trained whole
    assert not torch.equal(ft["head.1.weight"], torch.zeros_like(ft["head.1.weight"]))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_layers_pass_gradients_to_their_input(bits):
    """QLoRA's frozen base: at decode-sized inputs (where the int8 / int4 kernels, which have no backward, would
    run) a gradient to the input takes the dequantized GEMM; it equals the dequantized Linear's."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    q = Int8Linear.from_linear(lin) if bits == 8 else rtn_intn(lin, 4, 32)
    x = torch.randn(3, 64, requires_grad=True)
    q(x).pow(2).sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(ref, q.dequantize(), q.bias.detach()).pow(2).sum().backward()
    assert ref.grad.abs().mean() > 0.1  # gradients of order 1: bf16's rounding (where the GEMM runs in it) is not
    torch.testing.assert_close(x.grad, ref.grad, atol=3e-2, rtol=3e-2)
