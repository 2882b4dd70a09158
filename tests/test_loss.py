import pytest
import torch
import torch.nn.functional as F

from gptlab.model import loss as loss_module
from gptlab.model.loss import linear_cross_entropy


def _reference(h, w, t, ignore_index=-100):
    return F.cross_entropy((h @ w.t()).float(), t, ignore_index=ignore_index)


@pytest.mark.parametrize("select", [True, False])  # the CPU path (target rows only) and the GPU one (all, masked)
@pytest.mark.parametrize("ignored", [[], [3, 11, 40], [i for i in range(50) if i % 5]])  # none, few, 80%
@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_fused_linear_cross_entropy_matches_plain_fp32(chunk_rows, ignored, select, monkeypatch):
    monkeypatch.setattr(loss_module, "SELECT_ROWS_ON", ("cpu",) if select else ())
    torch.manual_seed(0)
    h = torch.randn(50, 16, requires_grad=True)
    w = torch.randn(97, 16, requires_grad=True)
    t = torch.randint(0, 97, (50,))
    t[ignored] = -100  # ignored positions carry no loss and no gradient (and skip the head)
    ref = _reference(h, w, t)
    gh_ref, gw_ref = torch.autograd.grad(ref, (h, w))
    loss = linear_cross_entropy(h, w, t, chunk_rows=chunk_rows)
    gh, gw = torch.autograd.grad(loss * 3.0, (h, w))  # the upstream gradient is applied
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh, 3 * gh_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw, 3 * gw_ref, atol=1e-5, rtol=1e-4)
    assert all(gh[i].abs().max() == 0 for i in ignored)


def test_fused_loss_under_bf16_autocast_is_close_and_keeps_fp32_grads():
    torch.manual_seed(0)
    h = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(200, 32, requires_grad=True)
    t = torch.randint(0, 200, (64,))
    ref = _reference(h, w, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, chunk_rows=16)
    loss.backward()
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 0.05 * ref.item()


def test_all_targets_ignored_gives_zero_loss_not_nan():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(h.grad).all()
