import math

import pytest
import torch

from gptlab.errors import GptlabError
from gptlab.model import GPT, PAPER_PARAMS, PRESETS, GPTConfig, preset
from gptlab.model.attention import attend, bool_mask, make_mask_mod, naive_attention

# The GPT-3 paper's labels are rounded: its own Table 2.1 shapes give 355.9M for "350M", 1.315B for
# "1.3B" and 2.65B for "2.7B" (12·L·d² + V·d + 2048·d). For those we hold the count to the table's shapes
# and allow 2% from the label.
LABEL_TOLERANCE = {"gpt3-medium": 0.02, "gpt3-xl": 0.02, "gpt3-2.7b": 0.02}


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_preset_param_counts_match_papers(name):
    cfg = preset(name)
    with torch.device("meta"):  # no allocation, even for 175B
        model = GPT(cfg)
    n = model.num_params()
    assert n == cfg.num_params()
    assert abs(n / PAPER_PARAMS[name] - 1) < LABEL_TOLERANCE.get(name, 0.01), f"{name}: {n / 1e6:.1f}M"


def test_param_counts_equal_transformers_on_meta():
    transformers = pytest.importorskip("transformers")
    for name in ["gpt2", "gpt2-medium", "gpt2-xl"]:
        c = PRESETS[name]
        hf_cfg = transformers.GPT2Config(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"])
        with torch.device("meta"):
            hf = transformers.GPT2LMHeadModel(hf_cfg)
        assert sum(p.numel() for p in hf.parameters()) == preset(name).num_params()
    hf_cfg = transformers.OpenAIGPTConfig()
    with torch.device("meta"):
        hf = transformers.OpenAIGPTLMHeadModel(hf_cfg)
    assert sum(p.numel() for p in hf.parameters()) == preset("gpt1").num_params()


def test_preset_architecture_choices():
    g1, g2, g3 = preset("gpt1"), preset("gpt2"), preset("gpt3-small")
    assert (g1.norm, g1.vocab_size, g1.block_size, g1.d_ff, g1.resid_pdrop) == ("post", 40478, 512, 3072, 0.1)
    assert g2.norm == "pre" and g2.scaled_residual_init and g2.block_size == 1024
    assert g3.block_size == 2048 and [g3.layer_attention(i) for i in range(4)] == ["dense", "local"] * 2
    with pytest.raises(GptlabError, match="unknown preset"):
        preset("gpt5")
    with pytest.raises(GptlabError, match="attention"):
        GPTConfig(attention=("banded",))


def test_init_stds():
    torch.manual_seed(0)
    cfg = preset("small-6x384", vocab_size=1000)
    m = GPT(cfg)
    resid = torch.cat([b.attn.c_proj.weight.flatten() for b in m.h] + [b.mlp.c_proj.weight.flatten() for b in m.h])
    assert resid.std().item() == pytest.approx(0.02 / math.sqrt(2 * cfg.n_layer), rel=0.03)
    assert m.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert m.lm_head.weight is m.wte.weight
    torch.manual_seed(0)
    g1 = GPT(GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=32, norm="post",
                       scaled_residual_init=False))
    assert isinstance(g1.ln_f, torch.nn.Identity)  # GPT-1 has no final LayerNorm
    assert g1.h[0].mlp.c_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize("kind", ["dense", "local", "strided", "fixed"])
@pytest.mark.parametrize("offset", [0, 37])
def test_attention_backends_match_naive(kind, offset):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=10, block_size=256, n_layer=1, n_head=2, n_embd=32, local_window=16,
                    sparse_stride=8, sparse_c=2)
    B, H, T, D = 2, 3, 96, 16
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    mask = bool_mask(make_mask_mod(kind, 16, 8, 2, offset, offset), T, T, "cpu")
    ref = naive_attention(q, k, v, mask)
    for backend in ["sdpa", "flex", "naive", "auto"]:
        out = attend(q, k, v, kind, cfg, offset, offset, backend=backend)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=f"{kind} {backend}")


def test_masks_are_what_the_papers_say():
    m = lambda kind: bool_mask(make_mask_mod(kind, 3, 4, 1), 9, 9, "cpu")  # noqa: E731
    local = m("local")
    assert local[5].nonzero().flatten().tolist() == [3, 4, 5]  # itself and window-1 before it
    strided = m("strided")
    assert strided[8].nonzero().flatten().tolist() == [0, 4, 5, 6, 7, 8]  # last 4, plus every 4th back
    fixed = m("fixed")
    assert fixed[6].nonzero().flatten().tolist() == [3, 4, 5, 6]  # own block 4..7, summary col 3 (j%4==3)
    assert not m("dense").triu(1).any()


def test_banded_layer_ignores_tokens_outside_its_band():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_embd=32, attention=("local",), local_window=4)
    m = GPT(cfg).eval()
    x = torch.randint(0, 50, (1, 20))
    x2 = x.clone()
    x2[0, 0] = (x[0, 0] + 1) % 50
    h1, h2 = m.hidden(x), m.hidden(x2)
    assert torch.equal(h1[0, 4:], h2[0, 4:])  # position 4 sees 1..4 only
    assert not torch.allclose(h1[0, 3], h2[0, 3])  # position 3 still sees token 0
    # a window of the sequence at its absolute positions gives the same hidden state
    for p in [5, 13, 19]:
        part = m.hidden(x[:, p - 3: p + 1], pos_offset=p - 3)
        torch.testing.assert_close(part[0, -1], h1[0, p], atol=1e-5, rtol=1e-5)


def test_forward_shapes_loss_and_context_limit():
    torch.manual_seed(0)
    m = GPT(preset("tiny", vocab_size=64))
    x = torch.randint(0, 64, (3, 16))
    logits, _ = m(x)
    assert logits.shape == (3, 16, 64)
    y = torch.randint(0, 64, (3, 16))
    none, loss = m(x, y)
    assert none is None  # the training path never materialises logits
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.view(-1, 64), y.view(-1)))
    assert loss.item() == pytest.approx(math.log(64), rel=0.05)  # near-uniform at init
    with pytest.raises(ValueError, match="exceeds the context"):
        m(torch.zeros(1, 65, dtype=torch.long))


def _hf_gpt2_from(m: GPT, transformers):
    c = m.cfg
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, layer_norm_epsilon=c.ln_eps, activation_function="gelu_new"))
    sd = {k.replace("wte", "transformer.wte").replace("wpe", "transformer.wpe").replace("ln_f", "transformer.ln_f")
          if not k.startswith("h.") else "transformer." + k: v for k, v in m.state_dict().items()}
    # HF's Conv1D stores (in, out): transpose our Linear weights
    sd = {k: (v.t() if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else v) for k, v in sd.items()}
    hf.load_state_dict(sd, strict=False)
    return hf.eval()


def test_gpt2_logits_match_transformers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=100, block_size=64, n_layer=3, n_head=4, n_embd=64)).eval()
    hf = _hf_gpt2_from(m, transformers)
    x = torch.randint(0, 100, (2, 40))
    torch.testing.assert_close(m(x)[0], hf(x).logits, atol=1e-5, rtol=1e-4)


def test_gpt1_post_ln_logits_match_transformers_openai_gpt():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=100, block_size=64, n_layer=3, n_head=4, n_embd=64, norm="post",
                      activation="gelu_tanh", scaled_residual_init=False, init_std=0.2)).eval()
    hf = transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(
        vocab_size=100, n_positions=64, n_embd=64, n_layer=3, n_head=4, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
        afn="gelu")).eval()
    sd = {}
    for k, v in m.state_dict().items():
        k2 = {"wte.weight": "transformer.tokens_embed.weight", "wpe.weight": "transformer.positions_embed.weight"}.get(k)
        if k2 is None and k.startswith("h."):
            k2 = "transformer." + k
            v = v.t() if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else v
        if k2:
            sd[k2] = v
    hf.load_state_dict(sd, strict=False)
    x = torch.randint(0, 100, (2, 40))
    torch.testing.assert_close(m(x)[0], hf(x).logits, atol=1e-5, rtol=1e-4)  # HF's GPT-1 "gelu" is the tanh one


def test_bf16_autocast_forward_close_to_fp32():
    torch.manual_seed(0)
    m = GPT(preset("tiny", vocab_size=64)).eval()
    x = torch.randint(0, 64, (2, 32))
    ref = m(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)[0]
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max().item() < 0.05
