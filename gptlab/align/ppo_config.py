"""PPOConfig: every knob of `gptlab ppo`, typed, with the help text the CLI shows (--ppo.KEY VALUE)."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

from gptlab.config import check_ranges, coerce, field
from gptlab.errors import GptlabError
from gptlab.runtime import TRAIN_DTYPES, canonical_dtype


@dataclass
class PPOConfig:
    # schedule
    iterations: int = field(20, "experience batches")
    rollout_prompts: int = field(16, "prompts per experience batch")
    samples_per_prompt: int = field(1, "responses per prompt")
    ppo_epochs: int = field(2, "passes over each experience batch")
    minibatch_size: int = field(8, "responses per optimizer step")
    micro_batch_size: int = field(0, "responses per forward/backward (0 = minibatch_size); accumulated")
    # sampling (temperature 1, no top-k/top-p: see experience.py)
    max_new_tokens: int = field(64, "response length limit (a response cut here gets the missing-end penalty)")
    temperature: float = field(1.0, "sampling temperature; keep 1: the KL is estimated from these samples")
    top_k: int = field(0, "top-k sampling (0 = off; biases the KL estimate)")
    top_p: float = field(1.0, "nucleus sampling (1 = off; biases the KL estimate)")
    # reward
    kl_coef: float = field(0.02, "β: per-token reward −β·KL(actor‖ref) (InstructGPT: 0.02)")
    kl_target: float | None = field(None, "set: Ziegler et al.'s adaptive controller drives the KL to this value")
    kl_horizon: int = field(10000, "adaptive controller time constant, in samples")
    kl_estimator: str = field("k1", "per-token KL estimator in the reward: k1 (log ratio, unbiased) | k2 | k3")
    missing_end_penalty: float | None = field(1.0, "subtracted from the score of a response cut at max_new_tokens")
    # advantages: PPO's critic, or a group baseline over the samples of one prompt (no critic)
    advantage: str = field("gae", "gae: a critic + GAE (PPO) | grpo: each reward normalised within its prompt's "
                                  "group (GRPO) | rloo: the group's leave-one-out mean as baseline (RLOO)")
    kl_penalty: str = field("reward", "where β·KL(actor‖ref) acts: reward (a per-token penalty; RLOO: per sequence) | "
                                      "loss (a term of the loss, GRPO's k3)")
    # PPO
    gamma: float = field(1.0, "GAE discount γ")
    lam: float = field(0.95, "GAE λ")
    clip: float = field(0.2, "PPO ratio clip ε (ratio kept in [1-ε, 1+ε])")
    value_clip: float | None = field(0.2, "value clipping around the old values (none = off)")
    vf_coef: float = field(0.1, "value-loss coefficient")
    ratio_guard: float | None = field(10.0, "skip a minibatch whose largest importance ratio exceeds this")
    ptx_coef: float = field(0.0, "PPO-ptx: + ptx_coef · LM loss on pretraining data")
    ptx_data: str | None = field(None, "a prepared data dir (gptlab prepare)")
    ptx_batch_size: int = field(4, "pretraining windows per micro-batch")
    # optimisation
    actor_lr: float = field(1e-5, "actor learning rate (constant)")
    critic_lr: float = field(1e-5, "critic learning rate (constant)")
    weight_decay: float = field(0.0, "AdamW weight decay")
    grad_clip: float = field(1.0, "global grad-norm clip over actor + critic (0 = off)")
    seed: int = field(1337, "seed: prompt order, minibatches, sampling, the eval split")
    dtype: str = field("auto", "compute dtype of rollouts and training: auto | bfloat16 | float32")
    frozen_dtype: str = field("auto", "weights of the reference and the reward model (auto: the compute dtype)")
    device: str = field("auto", "auto | cpu | cuda | cuda:N")
    forward_batch_size: int = field(16, "rows per scoring forward")
    # evaluation and checkpoints
    eval_prompts: Any = field(16, "prompts held out of the prompt set, or a prompt file")
    eval_samples: int = field(1, "responses per eval prompt")
    eval_seed: int = field(1234, "sampling seed of the held-out evaluation (before and after)")
    eval_every: int = field(0, "iterations between periodic evals (0 = before and after only)")
    checkpoint_every: int = field(5, "iterations between checkpoints")
    keep_last: int = field(2, "checkpoints to keep")
    show_samples: int = field(4, "samples kept in the summary")

    def __post_init__(self) -> None:
        ints = ("iterations", "rollout_prompts", "samples_per_prompt", "ppo_epochs", "minibatch_size")
        if any(getattr(self, k) < 1 for k in ints):
            raise GptlabError(f"ppo: {', '.join(ints)} must be ≥ 1")
        if self.advantage not in ("gae", "grpo", "rloo"):
            raise GptlabError(f"ppo: advantage must be gae, grpo or rloo, got {self.advantage!r}")
        if self.kl_penalty not in ("reward", "loss"):
            raise GptlabError(f"ppo: kl_penalty must be reward or loss, got {self.kl_penalty!r}")
        if self.advantage != "gae" and self.samples_per_prompt < 2:
            raise GptlabError(f"ppo: advantage {self.advantage} compares the samples of one prompt: samples_per_prompt "
                              "must be ≥ 2")
        n = self.rollout_prompts * self.samples_per_prompt
        if n % self.minibatch_size:
            raise GptlabError(f"ppo: rollout_prompts × samples_per_prompt ({n}) must be a multiple of minibatch_size "
                              f"({self.minibatch_size})")
        if self.micro_batch_size and self.minibatch_size % self.micro_batch_size:
            raise GptlabError(f"ppo: minibatch_size {self.minibatch_size} must be a multiple of micro_batch_size "
                              f"{self.micro_batch_size}")
        if self.kl_coef < 0 or (self.kl_target is not None and self.kl_target <= 0):
            raise GptlabError("ppo: kl_coef must be ≥ 0 and kl_target > 0")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise GptlabError(f"ppo: kl_estimator must be k1, k2 or k3, got {self.kl_estimator!r}")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise GptlabError("ppo: ptx_coef > 0 needs ptx_data (a prepared data dir)")
        for k in ("dtype", "frozen_dtype"):
            setattr(self, k, canonical_dtype(getattr(self, k), TRAIN_DTYPES, f"ppo.{k}"))
        ranges = (("clip", 0 < self.clip < 1, "in (0, 1)"), ("gamma", 0 <= self.gamma <= 1, "in [0, 1]"),
                  ("lam", 0 <= self.lam <= 1, "in [0, 1]"), ("vf_coef", self.vf_coef >= 0, "≥ 0"),
                  ("ptx_coef", self.ptx_coef >= 0, "≥ 0"),
                  ("actor_lr", self.actor_lr > 0, "> 0 (the critic's lr is a multiple of it)"),
                  ("critic_lr", self.critic_lr >= 0, "≥ 0"), ("weight_decay", self.weight_decay >= 0, "≥ 0"),
                  ("grad_clip", self.grad_clip >= 0, "≥ 0"), ("max_new_tokens", self.max_new_tokens >= 1, "≥ 1"),
                  ("micro_batch_size", self.micro_batch_size >= 0, "≥ 0"),
                  ("forward_batch_size", self.forward_batch_size >= 0, "≥ 0"),
                  ("eval_samples", self.eval_samples >= 1, "≥ 1"),
                  ("ptx_batch_size", self.ptx_batch_size >= 1, "≥ 1"),
                  ("value_clip", self.value_clip is None or self.value_clip > 0, "> 0 (or none)"),
                  ("ratio_guard", self.ratio_guard is None or self.ratio_guard > 0, "> 0 (or none)"),
                  ("missing_end_penalty", self.missing_end_penalty is None or self.missing_end_penalty >= 0,
                   "≥ 0 (or none)"))
        check_ranges(self, "ppo", ranges)
        if self.temperature <= 0:
            raise GptlabError("ppo: temperature must be > 0 (PPO needs sampled responses)")
        if self.top_k or self.top_p < 1.0 or self.temperature != 1.0:
            warnings.warn("ppo: sampling with top-k/top-p or temperature ≠ 1 draws responses from outside the "
                          "policy's own distribution; the KL estimate and the PPO ratio are then biased", stacklevel=2)

    @property
    def has_critic(self) -> bool:
        return self.advantage == "gae"

    @property
    def rollout_size(self) -> int:
        return self.rollout_prompts * self.samples_per_prompt

    @property
    def steps_per_iteration(self) -> int:
        return self.ppo_epochs * self.rollout_size // self.minibatch_size

    @classmethod
    def from_dict(cls, d: dict | None) -> "PPOConfig":
        """Keys checked, values coerced from strings (YAML, CLI); 'none'/'null' clear the optional ones."""
        return cls(**coerce(cls, dict(d or {}), "ppo"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# `gptlab grpo`: DeepSeekMath's GRPO (Shao et al. 2024): G = 8 samples a prompt, advantages normalised within
# each group, no critic, β = 0.04 on the k3 KL estimator as a loss term, one pass over each batch.
GRPO_DEFAULTS: dict = dict(advantage="grpo", kl_penalty="loss", kl_estimator="k3", kl_coef=0.04, samples_per_prompt=8,
                           rollout_prompts=4, minibatch_size=8, ppo_epochs=1, actor_lr=1e-5)
