"""Compressed run dirs: written by the API/CLI, loaded unchanged by load_run, decoding the same tokens as
the in-memory compressed model; real int8 storage; structured pruning shrinks the model; bad formats fail."""

import json
import random

import pytest
import torch
from safetensors import safe_open

from gptlab.compress import api
from gptlab.compress.format import storage_bytes
from gptlab.compress.hessian import calibration_windows
from gptlab.compress.prune import structured_prune
from gptlab.compress.report import val_perplexity
from gptlab.errors import GptlabError
from gptlab.generate import Generator, SamplingParams
from gptlab.model import GPT, preset
from gptlab.run import load_run, write_run_config
from gptlab.run.format import MODEL_FILE, save_model

WORDS = "the king and queen of a castle ride to war while merry fools sing songs of love and gold".split()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from gptlab.data.prepare import prepare

    root = tmp_path_factory.mktemp("compress")
    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(3000))
    (root / "corpus.txt").write_text(text)
    data = root / "data"
    prepare(str(root / "corpus.txt"), data, tokenizer="char", num_workers=1, progress=False)
    from gptlab.data.loader import TokenData

    tok = TokenData(data).tokenizer()
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.vocab_size, block_size=64)).eval()
    src = root / "dense"
    save_model(model, src / MODEL_FILE)
    write_run_config(src, model.cfg, tok, stage="pretrain")
    return root, data, src


def _greedy(model, tok, n=12):
    p = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
    return Generator(model, tok).generate(["the king "], p)[0].token_ids


CASES = {
    "int8": lambda src, out, data: api.quantize(src, out, method="int8"),
    "llm-int8": lambda src, out, data: api.quantize(src, out, method="llm-int8", threshold=1.0),
    "rtn4": lambda src, out, data: api.quantize(src, out, method="rtn", bits=4, group_size=32),
    "gptq4": lambda src, out, data: api.quantize(src, out, method="gptq", bits=4, group_size=32, data=data,
                                                 calib_samples=16, act_order=True, quiet=True),
    "magnitude": lambda src, out, data: api.prune(src, out, method="magnitude", sparsity=0.5, scope="global"),
    "nm": lambda src, out, data: api.prune(src, out, method="nm", n=2, m=4),
    "sparsegpt-q8": lambda src, out, data: api.sparsegpt(src, out, data=data, n=2, m=4, quant_bits=8,
                                                         calib_samples=16, blocksize=32, quiet=True),
    "structured": lambda src, out, data: api.prune(src, out, method="structured", heads=1, ffn=0.25),
}


def _in_memory(name, model, data):
    """The same compression applied to a model in memory (reference for the round trip)."""
    from gptlab.compress.prune import magnitude_prune, nm_prune

    tokens = calibration_windows(data, 16, model.cfg.block_size)
    if name in ("int8", "llm-int8", "rtn4", "gptq4"):
        kw = {"int8": dict(method="int8"), "llm-int8": dict(method="llm-int8", threshold=1.0),
              "rtn4": dict(method="rtn", bits=4, group_size=32),
              "gptq4": dict(method="gptq", bits=4, group_size=32, tokens=tokens, act_order=True)}[name]
        api.quantize_model(model, **kw)
    elif name == "magnitude":
        magnitude_prune(model, 0.5, "global")
    elif name == "nm":
        nm_prune(model, 2, 4)
    elif name == "sparsegpt-q8":
        api.sparsegpt_model(model, tokens, n=2, m=4, quant_bits=8, blocksize=32)
    else:
        model, _ = structured_prune(model, 1, 0.25)
    return model


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_generates_same_tokens(env, name):
    root, data, src = env
    out = CASES[name](src, root / name, data)
    loaded = load_run(out)
    ref = _in_memory(name, load_run(src).model, data)
    assert _greedy(loaded.model, loaded.tokenizer) == _greedy(ref, loaded.tokenizer)
    sd_ref = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    for k, v in loaded.model.state_dict().items():
        if k != "lm_head.weight":
            assert torch.equal(v, sd_ref[k]), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["compression"]["format"] == "gptlab-compress" and cfg["compression"]["steps"]
    assert val_perplexity(loaded.model, data, eval_tokens=2048)["val_ppl"] > 1


def test_int8_storage_is_real_int8_and_four_times_smaller(env):
    root, data, src = env
    out = api.quantize(src, root / "int8-size", method="int8")
    with safe_open(str(out / MODEL_FILE), "pt") as f:
        assert f.get_tensor("h.0.mlp.c_fc.weight_int8").dtype == torch.int8
        assert "h.0.mlp.c_fc.weight" not in f.keys()
    dense, q = load_run(src).model, load_run(out).model
    lin_bytes = lambda m: sum(t.numel() * t.element_size() for k, t in m.state_dict().items()  # noqa: E731
                              if k.startswith("h.") and ("weight" in k and "ln" not in k))
    assert lin_bytes(q) / lin_bytes(dense) < 0.25 + 1 / 64 + 1e-3  # int8 + one fp32 scale per row of 64 vs fp32
    assert storage_bytes(q) < storage_bytes(dense)
    assert torch.equal(q.wte.weight, dense.wte.weight) and q.lm_head.weight is q.wte.weight  # embeddings stay dense


def test_structured_pruning_really_removes_parameters(env):
    root, data, src = env
    dense = load_run(src).model
    out = api.prune(src, root / "structured-2", method="structured", heads=1, ffn=0.5)
    small = load_run(out).model
    assert small.cfg.n_head == dense.cfg.n_head - 1 and small.cfg.d_ff == dense.cfg.d_ff // 2
    assert small.num_params() == small.cfg.num_params() < dense.num_params()
    C, D, L = dense.cfg.n_embd, dense.cfg.head_dim, dense.cfg.n_layer
    removed_head = 3 * (C * D + D) + D * C
    removed_ffn = (C + 1) * (dense.cfg.d_ff // 2) + C * (dense.cfg.d_ff // 2)
    assert dense.num_params() - small.num_params() == L * (removed_head + removed_ffn)


def test_structured_pruning_of_dead_heads_and_channels_is_exact():
    """Heads and channels whose weights are zero contribute nothing: removing them must not change outputs."""
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=50, n_head=4, n_embd=64)).eval()
    H, D, F = 4, 16, model.cfg.d_ff
    with torch.no_grad():
        for blk in model.h:
            for j in range(3):  # head 2's q, k, v rows
                blk.attn.c_attn.weight[j * H * D + 2 * D: j * H * D + 3 * D] = 0
                blk.attn.c_attn.bias[j * H * D + 2 * D: j * H * D + 3 * D] = 0
            blk.attn.c_proj.weight[:, 2 * D:3 * D] = 0
            blk.mlp.c_fc.weight[: F // 4] = 0
            blk.mlp.c_fc.bias[: F // 4] = 0  # GELU(0) = 0: these channels are dead
    x = torch.randint(0, 50, (2, 10))
    small, rec = structured_prune(model, heads=1, ffn=0.25)
    torch.testing.assert_close(small(x)[0], model(x)[0], rtol=1e-5, atol=1e-5)
    assert rec["params_after"] < rec["params_before"]


def test_bad_formats_error_clearly(env):
    root, data, src = env
    out = api.quantize(src, root / "int8-bad", method="int8")
    cfg_path = out / "config.json"
    good = json.loads(cfg_path.read_text())
    for patch, msg in [({"format": "bnb-4bit"}, "unknown compression format"),
                       ({"version": 99}, "version 99 is not supported"),
                       ({"modules": {"h.0.mlp.c_fc": {"kind": "int3"}}}, "unknown compressed kind 'int3'"),
                       ({"modules": {"h.9.mlp.c_fc": {"kind": "int8"}}}, "does not exist")]:
        cfg = json.loads(json.dumps(good))
        cfg["compression"].update(patch)
        cfg_path.write_text(json.dumps(cfg))
        with pytest.raises(GptlabError, match=msg):
            load_run(out)
    cfg_path.write_text(json.dumps(good))
    with pytest.raises(GptlabError, match="already quantized"):
        api.quantize(out, root / "twice", method="int8")
    with pytest.raises(GptlabError, match="calibration data"):
        api.quantize(src, root / "nodata", method="gptq", bits=4)
    with pytest.raises(GptlabError, match="unknown quantization method"):
        api.quantize(src, root / "x", method="fp4")
    with pytest.raises(GptlabError, match="source run"):
        api.prune(src, src, method="magnitude")


def test_cli_compress_and_report(env, tmp_path, capsys):
    from gptlab.cli import main

    root, data, src = env
    assert main(["compress", "prune", str(src), "--out", str(tmp_path / "p"), "--method", "nm"]) == 2
    assert capsys.readouterr().err.strip() == "error: --method nm needs --n and --m (e.g. --n 2 --m 4)"
    assert main(["compress", "quantize", str(src), "--out", str(tmp_path / "q"), "--method", "int8"]) == 0
    assert main(["compress", "report", str(src), str(tmp_path / "q"), "--data", str(data), "--eval-tokens", "1024",
                 "--decode-tokens", "8", "--out", str(tmp_path / "rep")]) == 0
    rows = json.loads((tmp_path / "rep.json").read_text())
    assert [r["method"] for r in rows] == ["dense", "int8"] and rows[1]["bits"] == 8
    assert abs(rows[1]["val_ppl"] / rows[0]["val_ppl"] - 1) < 0.01
    assert "| run | method |" in (tmp_path / "rep.md").read_text()


@pytest.mark.parametrize("name", ["int8", "llm-int8", "rtn4"])
def test_compressed_runs_decode_in_bf16(env, name):
    """load_run(dtype=bfloat16) (evaluate/serve use it) keeps int8 codes and casts only scales and biases."""
    root, data, src = env
    out = root / f"{name}-bf16"
    CASES[name](src, out, data)
    run = load_run(out, dtype=torch.bfloat16)
    codes = run.model.h[0].mlp.c_fc.qweight if name == "rtn4" else run.model.h[0].mlp.c_fc.weight_int8
    assert codes.dtype in (torch.int8, torch.uint8)
    ids = _greedy(run.model, run.tokenizer, n=6)
    assert len(ids) == 6 and all(0 <= t < run.tokenizer.vocab_size for t in ids)


def test_quantized_runs_refuse_hf_export(env, tmp_path):
    from gptlab.interop.hf import export_hf

    root, data, src = env
    out = api.quantize(src, root / "int8-export", method="int8")
    with pytest.raises(GptlabError, match="is quantized"):
        export_hf(out, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
