"""The alignment losses against values computed by hand (comments show the arithmetic)."""

import math

import pytest
import torch

from gptlab.align import losses as L


def softplus(x: float) -> float:  # -log σ(-x)
    return math.log1p(math.exp(x))


def test_kwise_ranking_loss_k3_by_hand():
    # best first: r = (3, 1, 2). Pairs i<j: 3-1 = 2, 3-2 = 1, 1-2 = -1 (the model ranks 2nd and 3rd wrongly)
    r = torch.tensor([[3.0, 1.0, 2.0]])
    want = (softplus(-2) + softplus(-1) + softplus(1)) / 3  # = (0.126928 + 0.313262 + 1.313262) / 3
    assert want == pytest.approx(0.584484, abs=1e-6)
    assert L.kwise_ranking_loss(r, torch.ones(1, 3, dtype=torch.bool)).item() == pytest.approx(want, abs=1e-6)
    assert L.ranking_accuracy(r, torch.ones(1, 3, dtype=torch.bool)).item() == pytest.approx(2 / 3)


def test_kwise_ranking_loss_each_prompt_counts_once_with_ragged_k():
    # prompt A has K=3 (3 pairs), prompt B only 2 responses (1 pair): the loss is the mean of the two
    # per-prompt means, not the mean over 4 pairs.
    r = torch.tensor([[3.0, 1.0, 2.0], [0.0, 1.0, 99.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    a = (softplus(-2) + softplus(-1) + softplus(1)) / 3
    b = softplus(1)  # 0 - 1 = -1
    assert L.kwise_ranking_loss(r, valid).item() == pytest.approx((a + b) / 2, abs=1e-6)
    # accuracy is over pairs: A gets 2 of 3 right, B 0 of 1; the padded 99 is never compared
    assert L.ranking_accuracy(r, valid).item() == pytest.approx(2 / 4)


def test_ranking_accuracy_counts_ties_half():
    r = torch.tensor([[2.0, 2.0, 1.0]])  # (0,1) tie, (0,2) right, (1,2) right
    assert L.ranking_accuracy(r, torch.ones(1, 3, dtype=torch.bool)).item() == pytest.approx(2.5 / 3)


def test_kwise_loss_has_gradient_pushing_the_right_way():
    r = torch.tensor([[0.0, 0.0]], requires_grad=True)
    L.kwise_ranking_loss(r, torch.ones(1, 2, dtype=torch.bool)).backward()
    assert r.grad[0, 0] < 0 < r.grad[0, 1]  # descent raises the better response's reward


def test_dpo_loss_by_hand():
    # log π: chosen -10, rejected -12; reference -11 for both -> implicit rewards β·(+1), β·(-1)
    loss, rc, rr = L.dpo_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]),
                              torch.tensor([-11.0]), beta=0.1)
    assert loss.item() == pytest.approx(softplus(-0.2), abs=1e-6)  # -log σ(0.1 · (1 - (-1))) = 0.598139
    assert softplus(-0.2) == pytest.approx(0.598139, abs=1e-6)
    assert rc.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)


def test_gae_by_hand_with_prompt_and_pad_positions_masked():
    # row: [prompt, y0, y1, y2, pad]; rewards on y = (0, 0, 1), values (0.5, 0.4, 0.2), γ = 1, λ = 0.5
    # δ2 = 1 + 0 - 0.2 = 0.8          A2 = 0.8
    # δ1 = 0 + 0.2 - 0.4 = -0.2       A1 = -0.2 + 0.5·0.8 = 0.2
    # δ0 = 0 + 0.4 - 0.5 = -0.1       A0 = -0.1 + 0.5·0.2 = 0.0
    rewards = torch.tensor([[7.0, 0.0, 0.0, 1.0, 5.0]])  # 7 and 5 sit on masked positions: ignored
    values = torch.tensor([[3.0, 0.5, 0.4, 0.2, 9.0]])
    mask = torch.tensor([[False, True, True, True, False]])
    adv, ret = L.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.0, 0.2, 0.8, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, 0.5, 0.6, 1.0, 0.0]]))


def test_gae_gamma_discounts():
    # γ = 0.5, λ = 1: A_t = Σ γ^k r_{t+k} - V_t ; r = (0, 2), V = 0 -> A = (1, 2)
    adv, _ = L.gae(torch.tensor([[0.0, 2.0]]), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), 0.5, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[1.0, 2.0]]))


def test_clipped_policy_loss_by_hand():
    # ratio r and advantage A per token; loss = max(-A·r, -A·clip(r, 0.8, 1.2))
    #  r=1.5 A=+1: max(-1.5, -1.2) = -1.2 (clipped)   r=0.5 A=+1: max(-0.5, -0.8) = -0.5
    #  r=1.1 A=-2: max(2.2, 2.2)   =  2.2             r=0.5 A=-1: max(0.5, 0.8)   =  0.8 (clipped)
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.5, 3.0]])
    adv = torch.tensor([[1.0, 1.0, -2.0, -1.0, 100.0]])  # last token masked out
    mask = torch.tensor([[True, True, True, True, False]])
    old = torch.full_like(ratio, -2.0)
    loss, clipfrac, approx_kl = L.policy_loss(old + ratio.log(), old, adv, mask, clip=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2 + 0.8) / 4, abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)
    want_kl = sum(0.5 * math.log(x) ** 2 for x in (1.5, 0.5, 1.1, 0.5)) / 4
    assert approx_kl.item() == pytest.approx(want_kl, abs=1e-6)


def test_value_loss_by_hand():
    v, old, ret = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 2.5]]), torch.tensor([[2.0, 2.0]])
    m = torch.ones(1, 2, dtype=torch.bool)
    assert L.value_loss(v, old, ret, m).item() == pytest.approx(0.5 * (1.0 + 0.0) / 2)
    # clipped values: 0.5 + 0.2 = 0.7 -> (0.7-2)^2 = 1.69 > 1 ; 2.5 - 0.2 = 2.3 -> 0.09 > 0
    assert L.value_loss(v, old, ret, m, clip=0.2).item() == pytest.approx(0.5 * (1.69 + 0.09) / 2)


def test_kl_estimators_and_controllers():
    lp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])  # log ratio 1
    assert L.kl_per_token(lp, ref, "k1").item() == pytest.approx(1.0)
    assert L.kl_per_token(lp, ref, "k2").item() == pytest.approx(0.5)
    assert L.kl_per_token(lp, ref, "k3").item() == pytest.approx(math.exp(-1), abs=1e-6)
    assert L.kl_per_token(ref, lp, "k3").item() >= 0  # k3 is never negative
    with pytest.raises(ValueError):
        L.kl_per_token(lp, ref, "k9")
    c = L.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(current_kl=12.0, n_steps=100)  # error clipped to +0.2 -> β·(1 + 0.2·100/10000)
    assert c.value == pytest.approx(0.1002)
    c.update(current_kl=3.0, n_steps=100)  # error -0.5 clipped to -0.2
    assert c.value == pytest.approx(0.1002 * 0.998)
    f = L.FixedKLController(0.02)
    f.update(50.0, 100)
    assert f.value == 0.02


def test_whiten_and_masked_stats():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[True, True, True, False]])
    assert L.masked_mean(x, m).item() == pytest.approx(2.0)
    assert L.masked_var(x, m).item() == pytest.approx(2 / 3)
    s = math.sqrt(1.5)
    torch.testing.assert_close(L.whiten(x, m), torch.tensor([[-s, 0.0, s, 0.0]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(L.whiten(x, m, shift_mean=False), torch.tensor([[2 - s, 2.0, 2 + s, 0.0]]),
                               atol=1e-5, rtol=0)


def test_token_logprobs_and_entropy_match_naive():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5).to(torch.bfloat16)
    tgt = torch.randint(0, 5, (2, 3))
    p = torch.softmax(logits.double(), -1)
    want = p.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).log()
    torch.testing.assert_close(L.token_logprobs(logits, tgt).double(), want, atol=1e-6, rtol=0)
    assert L.token_logprobs(logits, tgt).dtype == torch.float32
    torch.testing.assert_close(L.entropy_from_logits(logits).double(), -(p * p.log()).sum(-1), atol=1e-6, rtol=0)
