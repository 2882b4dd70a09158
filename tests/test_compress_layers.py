"""Layer-level compression tests against independent references: quantization error bounds, LLM.int8
outliers, exact sparsity and N:M patterns, SparseGPT and GPTQ reconstruction error vs the baselines."""

import warnings

import pytest
import torch
import torch.nn as nn

from gptlab.compress.gptq import gptq_quantize
from gptlab.compress.hessian import HessianAccumulator, inverse_cholesky
from gptlab.compress.prune import magnitude_prune, nm_prune, smallest_mask
from gptlab.compress.quant import (Int8Linear, IntNLinear, LLMInt8Linear, absmax_scale, pack_nibbles, quantize_symmetric,
                                   rtn_intn, unpack_nibbles)
from gptlab.compress.sparsegpt import sparsegpt_prune
from gptlab.errors import GptlabError
from gptlab.model import GPT, preset


def _layer_and_inputs(rows=48, cols=128, n=1024, seed=0):
    """A weight matrix and correlated calibration inputs (as real activations are), plus H = 2XᵀX/n."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols) * 0.3
    X = torch.randn(n, cols, generator=g) @ mix * (0.2 + 2.8 * torch.rand(cols, generator=g))  # (n, in): uneven scales
    acc = HessianAccumulator(cols)
    for chunk in X.split(300):
        acc.add(chunk)
    return W, X, acc.H


def _recon_err(W, What, X):
    return float(((W - What) @ X.t()).pow(2).sum())  # ‖(W − Ŵ)X‖²


def test_hessian_accumulator_is_two_xxt_over_n():
    _, X, H = _layer_and_inputs(rows=4, cols=16, n=700)
    ref = 2 * X.double().t() @ X.double() / X.size(0)
    torch.testing.assert_close(H.double(), ref, rtol=1e-4, atol=1e-4)


def test_int8_quantize_dequantize_error_bound():
    torch.manual_seed(0)
    w = torch.randn(32, 80) * torch.rand(32, 1) * 3
    w[5] = 0  # an all-zero row must not divide by zero
    s = absmax_scale(w)
    q = quantize_symmetric(w, s)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    err = (w - q.float() * s[:, None]).abs()
    assert torch.all(err <= s[:, None] / 2 + 1e-6)  # round to nearest: at most half a step
    assert torch.all(q[5] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 15, 80])  # the int8 streaming kernel (≤ 32 rows) and dequantize + GEMM
def test_int8_linear_matches_dequantized_matmul(dtype, rows):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    m = Int8Linear.from_linear(lin)
    x = torch.randn(rows, 1, 96)
    ref = x @ m.dequantize().t() + lin.bias.detach()
    y = m.to(dtype)(x.to(dtype))
    assert y.dtype == dtype and y.shape == (rows, 1, 40)
    torch.testing.assert_close(y.float(), ref, rtol=0.02, atol=0.03)  # computed in bf16
    assert m.weight_int8.dtype == torch.int8


def test_intn_packing_and_rtn_error_bound():
    codes = torch.randint(0, 16, (6, 10), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)
    torch.manual_seed(1)
    lin = nn.Linear(64, 12)
    m = rtn_intn(lin, bits=4, group_size=16)
    assert m.qweight.shape == (12, 32) and m.qweight.dtype == torch.uint8 and m.scales.shape == (12, 4)
    err = (lin.weight.detach() - m.dequantize()).abs().view(12, 4, 16)
    assert torch.all(err <= m.scales[..., None] / 2 + 1e-6)
    x = torch.randn(2, 64)
    torch.testing.assert_close(m(x), x @ m.dequantize().t() + lin.bias.detach(), rtol=0.02, atol=0.02)  # bf16 compute


def test_llm_int8_keeps_outlier_columns_exact():
    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    m = LLMInt8Linear.from_linear(lin, threshold=6.0)
    W_hat = m.dequantize()
    x = torch.randn(4, 64)
    x[:, 7] = torch.tensor([200.0, -150.0, 90.0, 300.0])  # an outlier feature (|x| ≥ 6)
    x[2, 30] = 8.0  # outlier in one row marks the whole column
    y = m(x)
    # independent reference: outlier columns in fp32 against the dequantized weights; the rest vector-wise int8
    out = torch.zeros(64, dtype=torch.bool)
    out[[7, 30]] = True
    xr = x[:, ~out]
    sx = xr.abs().amax(1, keepdim=True) / 127
    qx = torch.round(xr / sx)
    ref = x[:, out] @ W_hat[:, out].t() + (qx @ m.weight_int8[:, ~out].float().t()) * sx * m.weight_scale + lin.bias
    torch.testing.assert_close(y, ref.detach(), rtol=1e-5, atol=1e-4)
    exact = x @ W_hat.t() + lin.bias
    err_mixed = (y - exact).abs().max()
    # without the decomposition the outliers blow up the row scales: far larger error
    plain = LLMInt8Linear.from_linear(lin, threshold=float("inf"))
    err_plain = (plain(x) - exact).abs().max()
    assert err_mixed < 0.05 and err_plain > 10 * err_mixed


def test_smallest_mask_counts_are_exact_with_ties():
    s = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    assert int(smallest_mask(s, 3).sum()) == 3
    assert torch.equal(smallest_mask(s, 1, dim=1).sum(1), torch.tensor([1, 1]))


def _tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(preset("tiny", vocab_size=64)).eval()


def test_magnitude_layer_and_global_exact_sparsity():
    model = _tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    magnitude_prune(model, 0.3, "layer")
    for blk in model.h:
        for lin in (blk.attn.c_attn, blk.attn.c_proj, blk.mlp.c_fc, blk.mlp.c_proj):
            assert int((lin.weight == 0).sum()) == round(lin.weight.numel() * 0.3)
    assert torch.equal(model.wte.weight, before["wte.weight"])  # embeddings (and the tied head) stay dense
    model = _tiny()
    orig = [lin.weight.detach().abs().clone() for blk in model.h
            for lin in (blk.attn.c_attn, blk.attn.c_proj, blk.mlp.c_fc, blk.mlp.c_proj)]
    magnitude_prune(model, 0.6, "global")
    now = [lin.weight for blk in model.h for lin in (blk.attn.c_attn, blk.attn.c_proj, blk.mlp.c_fc, blk.mlp.c_proj)]
    total = sum(w.numel() for w in now)
    assert sum(int((w == 0).sum()) for w in now) == round(total * 0.6)
    pruned = torch.cat([o[w == 0] for o, w in zip(orig, now)])
    kept = torch.cat([o[w != 0] for o, w in zip(orig, now)])
    assert pruned.max() <= kept.min()  # global: every pruned |w| is below every kept one, across layers


def test_nm_2_of_4_pattern_keeps_largest():
    model = _tiny()
    orig = model.h[0].mlp.c_fc.weight.detach().clone()
    nm_prune(model, 2, 4)
    w = model.h[0].mlp.c_fc.weight.detach()
    groups, og = w.view(w.size(0), -1, 4), orig.view(orig.size(0), -1, 4)
    assert torch.all((groups != 0).sum(-1) == 2)
    kept_ref = torch.topk(og.abs(), 2, dim=-1).indices.sort(-1).values
    kept = torch.nonzero(groups != 0)[:, 2].view(w.size(0), -1, 2)
    assert torch.equal(kept, kept_ref)
    with pytest.raises(GptlabError, match="0 < n < m"):
        nm_prune(model, 4, 4)


def test_sparsegpt_beats_magnitude_on_the_same_layer():
    W, X, H = _layer_and_inputs()
    res = sparsegpt_prune(W, H, sparsity=0.5, blocksize=32)
    assert int((res.weight == 0).sum()) == W.numel() // 2  # exact 50%
    mag = W.clone()
    mag.masked_fill_(smallest_mask(W.abs(), W.numel() // 2), 0)
    e_sgpt, e_mag = _recon_err(W, res.weight, X), _recon_err(W, mag, X)
    assert e_sgpt < 0.5 * e_mag, (e_sgpt, e_mag)
    # 2:4: the pattern holds and SparseGPT still wins over magnitude 2:4
    r24 = sparsegpt_prune(W, H, n=2, m=4, blocksize=32)
    assert torch.all((r24.weight.view(W.size(0), -1, 4) != 0).sum(-1) == 2)
    m24 = W.clone().view(W.size(0), -1, 4)
    m24.masked_fill_(smallest_mask(m24.abs(), 2, dim=2), 0)
    assert _recon_err(W, r24.weight, X) < 0.6 * _recon_err(W, m24.view_as(W), X)


def test_sparsegpt_zero_sparsity_changes_nothing():
    W, _, H = _layer_and_inputs(rows=8, cols=64)
    assert torch.equal(sparsegpt_prune(W, H, sparsity=0.0, blocksize=16).weight, W)


def test_gptq_beats_round_to_nearest_per_layer():
    W, X, H = _layer_and_inputs()
    lin = nn.Linear(W.size(1), W.size(0), bias=False)
    lin.weight.data.copy_(W)
    for group in (0, 32):
        rtn = rtn_intn(lin, 4, group).dequantize()
        for act_order in (False, True):
            r = gptq_quantize(W, H, bits=4, group_size=group, blocksize=32, act_order=act_order)
            m = IntNLinear.from_codes(lin, r.codes, r.scales, r.zeros, 4, group)
            torch.testing.assert_close(m.dequantize(), r.weight, rtol=0, atol=1e-5)  # codes reproduce the weights
            assert _recon_err(W, r.weight, X) < 0.8 * _recon_err(W, rtn, X), (group, act_order)
    r8 = gptq_quantize(W, H, bits=8)
    assert r8.codes.dtype == torch.int8 and _recon_err(W, r8.weight, X) < _recon_err(
        W, Int8Linear.from_linear(lin).dequantize(), X)


def test_cholesky_retries_with_more_dampening_then_errors():
    H = torch.diag(torch.tensor([1.0, 1.0, -0.5]))  # not positive definite at 1% dampening
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        U, damp = inverse_cholesky(H, 0.01, what="h.0.mlp.c_fc")
    assert damp > 0.01 and any("succeeded at" in str(x.message) for x in w)
    Hd = H + damp * H.diag().mean() * torch.eye(3)
    torch.testing.assert_close(U.t() @ U, torch.linalg.inv(Hd), rtol=1e-4, atol=1e-5)
    with pytest.raises(GptlabError, match="not positive definite"):
        inverse_cholesky(H, 0.01, max_tries=1)


def test_sparsegpt_joint_quantization_keeps_zeros_on_the_grid():
    W, X, H = _layer_and_inputs(rows=16, cols=64)
    r = sparsegpt_prune(W, H, sparsity=0.5, quant_bits=4, blocksize=32)
    assert int((r.weight == 0).sum()) >= W.numel() // 2  # pruned weights stay exactly zero
    codes = r.grid.codes(r.weight).float()
    s, z = r.grid.scale, r.grid.zero  # (out, 1) per channel
    torch.testing.assert_close(s * (codes - z), r.weight, rtol=0, atol=1e-5)  # every weight on the 4-bit grid


def test_int8_linear_sees_in_place_scale_changes():
    torch.manual_seed(0)
    m = Int8Linear.from_linear(nn.Linear(32, 8, bias=False))
    x = torch.randn(1, 32)
    y1 = m(x)
    with torch.no_grad():
        m.weight_scale.mul_(2)  # the cached bf16 copy of the scales must follow
    torch.testing.assert_close(m(x), 2 * y1, rtol=0.02, atol=1e-3)


@pytest.mark.parametrize("group", [0, 32, 64])
@pytest.mark.parametrize("rows", [1, 40])  # decoding (int4 kernel where torch has it) and dequantize + GEMM
def test_int4_linear_matches_dequantized_matmul(group, rows):
    torch.manual_seed(0)
    lin = nn.Linear(128, 32)
    m = rtn_intn(lin, 4, group)
    x = torch.randn(rows, 128)
    ref = x @ m.dequantize().t() + lin.bias.detach()
    torch.testing.assert_close(m(x), ref, rtol=0.02, atol=0.02)
    torch.testing.assert_close(m.to(torch.bfloat16)(x.bfloat16()).float(), ref, rtol=0.03, atol=0.05)
    if rows == 1 and m._int4_kernel_group():
        m = rtn_intn(lin, 4, group)
        with torch.no_grad():
            m.scales.mul_(2)  # in-place changes reach the kernel's cached operands
        torch.testing.assert_close(m(x), 2 * ref - lin.bias.detach(), rtol=0.02, atol=0.04)
