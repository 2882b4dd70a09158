"""Every alignment loss in one place (OpenRLHF style): reward ranking, DPO, and PPO's pieces.

Per-token tensors are (B, T) over the full sequence, with a ``mask`` that is True (or 1) on the
response tokens being scored; masked-out entries never enter a mean, a sum or a recursion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptlab.model.loss import token_logprobs  # noqa: F401  (the one log-prob function, used with these losses)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise the masked entries to unit variance (and zero mean); 0 elsewhere."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, T, V) -> (B, T) entropy of the softmax distribution, in fp32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# --- reward model: K ranked responses per prompt (InstructGPT eq. 1) ---------------------------------
def _pairs(rewards: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> (N, K, K) differences r_i - r_j and the mask of valid pairs i < j (i ranked better)."""
    K = rewards.shape[1]
    diff = rewards.unsqueeze(2) - rewards.unsqueeze(1)  # (N, K, K): [n, i, j] = r_i - r_j
    upper = torch.ones(K, K, dtype=torch.bool, device=rewards.device).triu(1)
    pair = upper & valid.unsqueeze(2) & valid.unsqueeze(1)
    return diff, pair


def kwise_ranking_loss(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """-1/C(k,2) Σ_{i<j} log σ(r_i − r_j) per prompt, averaged over prompts. ``rewards`` (N, K) are
    ranked best first; ``valid`` (N, K) marks real responses (prompts with fewer than K are padded).
    All comparisons of one prompt are one batch element, so a prompt counts once however large K is."""
    diff, pair = _pairs(rewards.float(), valid.bool())
    per_pair = -F.logsigmoid(diff) * pair
    n_pairs = pair.sum((1, 2))
    per_prompt = per_pair.sum((1, 2)) / n_pairs.clamp(min=1)
    has = n_pairs > 0
    return per_prompt[has].mean() if has.any() else rewards.sum() * 0.0


def ranking_accuracy(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Fraction of valid pairs (i better than j) with r_i > r_j; a tie counts half."""
    diff, pair = _pairs(rewards.float(), valid.bool())
    right = (diff > 0).float() + 0.5 * (diff == 0).float()
    return (right * pair).sum() / pair.sum().clamp(min=1)


# --- DPO (Rafailov et al. 2023) -------------------------------------------------------------------------
def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs (N,) summed response log-probs. Returns (loss, chosen rewards, rejected rewards); the
    implicit rewards β·(log π − log π_ref) are detached (for logging and accuracy)."""
    chosen = pi_chosen.float() - ref_chosen.float()
    rejected = pi_rejected.float() - ref_rejected.float()
    loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    return loss, (beta * chosen).detach(), (beta * rejected).detach()


# --- PPO (Schulman et al. 2017; as used by Ziegler et al. 2019 and InstructGPT) --------------------------
def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimators of KL(π‖π_ref) from samples of π (Schulman's k1/k2/k3). k1 is unbiased but
    can be negative per token; k3 is unbiased and never negative."""
    log_ratio = logprobs.float() - ref_logprobs.float()
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r} (k1, k2 or k3)")


@torch.no_grad()
def group_advantages(rewards: torch.Tensor, group: int, kind: str) -> torch.Tensor:
    """(N,) sequence rewards, rows in groups of `group` samples of one prompt -> (N,) advantages.
    grpo (Shao et al. 2024): (r − mean) / (std + 1e-4) within the group; rloo (Ahmadian et al. 2024):
    r − the mean of the group's other rewards. A group whose rewards are all equal gets 0."""
    r = rewards.float().view(-1, group)  # (P, G)
    if kind == "grpo":
        adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)
    elif kind == "rloo":
        adv = r - (r.sum(1, keepdim=True) - r) / (group - 1)
    else:
        raise ValueError(f"unknown group advantage {kind!r} (grpo or rloo)")
    return adv.reshape(-1)


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked (response) tokens of each row.

    δ_t = r_t + γ V_{t+1} − V_t with V = 0 after the last response token (the episode ends there);
    A_t = δ_t + γλ A_{t+1}. Returns (advantages, returns = A + V), both 0 outside the mask."""
    m = mask.to(rewards.dtype)
    r, v = rewards * m, values.float() * m
    T = r.shape[1]
    adv = torch.zeros_like(r)
    next_adv = torch.zeros_like(r[:, 0])
    next_value = torch.zeros_like(r[:, 0])
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        a = delta + gamma * lam * next_adv
        # outside the mask carry the running values through unchanged (handles left/right padding)
        adv[:, t] = a * m[:, t]
        next_adv = torch.where(m[:, t] > 0, a, next_adv)
        next_value = torch.where(m[:, t] > 0, v[:, t], next_value)
    return adv, (adv + v) * m


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (to minimise). Returns (loss, clip fraction, approx KL(old‖new))."""
    log_ratio = logprobs.float() - old_logprobs.float()
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio ** 2, mask)
    return loss, clipfrac, approx_kl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None = None) -> torch.Tensor:
    """0.5·E[(V − R)²]; with ``clip`` the pessimistic max with the value clipped around the old one."""
    err = (values.float() - returns) ** 2
    if clip is not None:
        v_clipped = old_values + (values.float() - old_values).clamp(-clip, clip)
        err = torch.maximum(err, (v_clipped - returns) ** 2)
    return 0.5 * masked_mean(err, mask)


class FixedKLController:
    """β stays where it was set (InstructGPT: a fixed KL reward coefficient)."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. 2019: move β so the observed KL tracks ``target`` (proportional control, error
    clipped to ±20%, time constant ``horizon`` samples)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon
