"""The trained half of PPO: `ActorCritic` (actor + critic in one module for the one engine) and
`PPOLoss` (clipped policy loss + value loss (+ PPO-ptx), the ratio guard, per-step statistics)."""

from __future__ import annotations

import torch

from gptlab.align.experience import response_logits
from gptlab.align.losses import entropy_from_logits, kl_per_token, masked_mean, policy_loss, token_logprobs, value_loss
from gptlab.align.ppo_config import PPOConfig
from gptlab.align.reward import token_scores
from gptlab.stage import unwrap
from gptlab.model import GPT


# --- the trained pair ------------------------------------------------------------------------------
class ActorCritic(torch.nn.Module):
    """Actor (a GPT with its LM head) and critic (a GPT with a scalar head) trained together. `forward`
    returns the actor's log-probs and entropy and the critic's values at the response positions."""

    def __init__(self, actor: GPT, critic: GPT | None, temperature: float = 1.0):
        super().__init__()  # critic None: GRPO / RLOO, whose baselines come from the group, not a value model
        self.actor, self.critic, self.temperature = actor, critic, temperature

    def forward(self, seq: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor):
        logits = response_logits(self.actor, seq, positions, self.temperature)  # (N, R, V)
        logprobs = token_logprobs(logits, targets)
        with torch.no_grad():
            entropy = entropy_from_logits(logits)
        values = token_scores(self.critic, seq).gather(1, positions) if self.critic is not None else None
        return logprobs, values, entropy

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return sum(m.flops_per_token(seq_len) for m in (self.actor, self.critic) if m is not None)


# --- the loss ----------------------------------------------------------------------------------------
class PPOLoss:
    """loss_fn for the engine: clipped policy loss + vf_coef · (clipped) value loss (with a critic)
    (+ β · KL(actor‖ref), GRPO's k3 estimate, with kl_penalty "loss") (+ ptx_coef · LM loss). Returns None
    (skip) when the minibatch's largest importance ratio exceeds ratio_guard. Accumulates the per-step
    statistics that `metrics()` hands to the engine's log."""

    def __init__(self, cfg: PPOConfig):
        self.cfg = cfg
        self.kl_coef = cfg.kl_coef  # β of the current iteration (the loop sets it: the controller may move it)
        self._acc: dict[str, float] = {}
        self._n = 0
        self.skipped = 0
        self.extra: dict = {}  # experience statistics to log with the next step

    def __call__(self, model: torch.nn.Module, batch: tuple) -> torch.Tensor | None:
        mb, ptx = batch
        cfg, m = self.cfg, mb.mask
        logprobs, values, entropy = model(mb.seq, mb.positions, mb.targets)
        with torch.no_grad():
            ratio_max = float((logprobs - mb.logprobs).masked_fill(~m, float("-inf")).max().exp())
        if cfg.ratio_guard is not None and ratio_max > cfg.ratio_guard:
            self.skipped += 1
            self._add(ratio_max=ratio_max)
            return None
        pg, clipfrac, approx_kl = policy_loss(logprobs, mb.logprobs, mb.advantages, m, cfg.clip)
        loss = pg
        stats = dict(policy_loss=pg.item(), clipfrac=clipfrac.item(), approx_kl=approx_kl.item(),
                     entropy=masked_mean(entropy, m).item(), ratio_max=ratio_max)
        if values is not None:
            vl = value_loss(values, mb.values, mb.returns, m, cfg.value_clip)
            loss = loss + cfg.vf_coef * vl
            stats["value_loss"] = vl.item()
        if cfg.kl_penalty == "loss":
            kl = masked_mean(kl_per_token(logprobs, mb.ref_logprobs, cfg.kl_estimator), m)
            loss = loss + self.kl_coef * kl
            stats["kl_loss"] = kl.item()
        if ptx is not None:
            lm = unwrap(model).actor(*ptx)[1]
            loss = loss + cfg.ptx_coef * lm
            stats["ptx_loss"] = lm.item()
        with torch.no_grad():  # explained variance of the returns by the critic's values
            if values is None:
                self._add(**stats)
                self._n += 1
                return loss
            var = masked_mean((mb.returns - masked_mean(mb.returns, m)) ** 2, m)
            stats["explained_variance"] = (1 - masked_mean((mb.returns - values) ** 2, m) / var.clamp(min=1e-8)).item()
        self._add(**stats)
        self._n += 1
        return loss

    def _add(self, **vals) -> None:
        for k, v in vals.items():
            if k == "ratio_max":
                self._acc[k] = max(self._acc.get(k, 0.0), v)
            else:
                self._acc[k] = self._acc.get(k, 0.0) + v

    def metrics(self) -> dict:
        out = {k: (v if k == "ratio_max" else v / max(self._n, 1)) for k, v in self._acc.items()}
        out["skipped_minibatches"] = self.skipped
        out.update(self.extra)
        self._acc, self._n, self.skipped, self.extra = {}, 0, 0, {}
        return out
