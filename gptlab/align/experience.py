"""PPO experience making, kept apart from the optimisation (as OpenRLHF does): prompts in, a batch of
scored, advantage-annotated rollouts out.

One experience batch:
1. render each prompt conversation with the chat template (generation prompt appended) and sample a
   response with the KV-cache `Generator` from the current actor, stopping at `<|end|>` (which, when
   sampled, is part of the response: it is an action the policy took);
2. one batched forward each (no grad, the training step's numerics) for the actor's log-probs
   (recomputed, never taken from the sampler), the frozen reference's log-probs, the critic's values and
   the reward: the reward model's score at the response's last token (its `<|end|>`), or
   `reward_fn(prompts, responses)`;
3. per-token reward −β·KL(actor‖ref) with the score added at the last response token, GAE (γ, λ) and
   whitened advantages. A response that hit max_new_tokens without `<|end|>` is still scored where it
   stopped, and `missing_end_penalty` is subtracted from its score (TRL's missing_eos_penalty), so the
   policy learns to finish its turns; None or 0 turns the penalty off.

Layout: rows are prompt + response, right-padded. Every per-token tensor is in *response coordinates*
(N, R): column j is response token j of the row, `mask[i, j] = j < len(response_i)`, and
`positions[i, j]` is the index in `seq` of the hidden state that predicts it (prompt_len_i − 1 + j).
Right padding needs no attention mask in a causal model (real tokens never see the pads after them), and
nothing is ever read at a pad: scores at `end_index`, values/log-probs through `positions` under `mask`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, fields
from typing import Callable

import torch

from gptlab.align.losses import (entropy_from_logits, gae, group_advantages, kl_per_token, masked_mean, token_logprobs,
                                 whiten)
from gptlab.align.reward import token_scores
from gptlab.chat.template import END, render_ids, render_text
from gptlab.errors import GptlabError
from gptlab.generate import Generator, SamplingParams
from gptlab.model import GPT
from gptlab.model.lora import adapters_off
from gptlab.tokenizer import Tokenizer

RewardFn = Callable[[list[str], list[str]], list[float]]


@dataclass
class Experience:
    seq: torch.Tensor           # (N, T) prompt + response ids, right-padded
    positions: torch.Tensor     # (N, R) index in seq of the state that predicts response token j
    targets: torch.Tensor       # (N, R) response token j (pad id beyond the response)
    mask: torch.Tensor          # (N, R) bool, True on the response tokens
    logprobs: torch.Tensor      # (N, R) actor log π(token) at sampling time (the PPO "old" policy)
    ref_logprobs: torch.Tensor  # (N, R) reference log π_ref(token)
    values: torch.Tensor        # (N, R) critic values of the state before each token
    rewards: torch.Tensor       # (N, R) −β·KL per token, + the score at the last token
    advantages: torch.Tensor    # (N, R) GAE advantages, whitened over the batch's response tokens
    returns: torch.Tensor       # (N, R) GAE returns (value targets)
    scores: torch.Tensor        # (N,) reward per response, after the missing-end penalty
    ended: torch.Tensor         # (N,) bool: the response finished with <|end|>
    prompts: list[str] = field(default_factory=list)    # rendered prompt text (what reward_fn sees)
    responses: list[str] = field(default_factory=list)  # response text without <|end|>
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.seq.size(0)

    def select(self, rows: torch.Tensor | list[int]) -> "Experience":
        """A minibatch of rows, trimmed to the longest sequence / response among them."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.seq.device)
        mask = self.mask[rows]
        R = max(1, int(mask.sum(1).max()))
        positions = self.positions[rows, :R]
        T = int((positions + 2).masked_fill(~mask[:, :R], 0).max())  # last response token's index + 1
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if not torch.is_tensor(v):
                out[f.name] = [v[i] for i in rows.tolist()] if isinstance(v, list) and v else v
            elif f.name == "seq":
                out[f.name] = v[rows, :T]
            elif v.dim() == 2:
                out[f.name] = v[rows, :R]
            else:
                out[f.name] = v[rows]
        return Experience(**out)


def layout(prompts: list[list[int]], responses: list[list[int]], pad: int,
           device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token lists -> (seq (N, T), positions (N, R), targets (N, R), mask (N, R)); see the module doc."""
    N = len(prompts)
    T = max(len(p) + len(r) for p, r in zip(prompts, responses))
    R = max(len(r) for r in responses)
    seq = torch.full((N, T), pad, dtype=torch.long)
    targets = torch.full((N, R), pad, dtype=torch.long)
    positions = torch.zeros((N, R), dtype=torch.long)
    mask = torch.zeros((N, R), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not p or not r:
            raise ValueError("every row needs a non-empty prompt and response")
        seq[i, :len(p) + len(r)] = torch.tensor(p + r)
        targets[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
        # pad columns point at the row's last real position: a valid index, never read (masked)
        positions[i] = (len(p) - 1 + torch.arange(R)).clamp(max=len(p) + len(r) - 2)
    return seq.to(device), positions.to(device), targets.to(device), mask.to(device)


def gather_states(h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(N, T, C) hidden states, (N, R) positions -> (N, R, C)."""
    return h.gather(1, positions.unsqueeze(-1).expand(-1, -1, h.size(-1)))


def response_logits(model: GPT, seq: torch.Tensor, positions: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Logits (N, R, V) of the distributions each response token was drawn from. The LM head runs on the
    response states only, so (N, T, V) logits are never materialised."""
    logits = model.lm_head(gather_states(model.hidden(seq), positions))
    return logits / temperature if temperature != 1.0 else logits


def critic_values(critic: GPT, seq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The critic's scalar head on the state before each response token: (N, R) values, fp32. The same
    head the reward model reads at `<|end|>`, here read at every response position."""
    return token_scores(critic, seq).gather(1, positions)


@contextlib.contextmanager
def unpacked(model: torch.nn.Module):
    """Run `model` without the generator's prepacked CPU linears (gptlab.generate.packed), so the log-probs
    recorded here come from the same kernels as the training forward: the packed kernels round differently,
    which would put a spurious ratio ≠ 1 into PPO's first minibatch."""
    saved = {m: m.__dict__.pop("forward") for m in model.modules() if "forward" in m.__dict__}
    try:
        yield
    finally:
        for m, f in saved.items():
            m.forward = f


@dataclass
class ExperienceConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    kl_estimator: str = "k1"
    missing_end_penalty: float | None = 1.0  # subtracted from the score of a response cut at max length
    forward_batch_size: int = 16  # rows per scoring forward (bounds the (rows, R, V) logits)
    advantage: str = "gae"  # gae (critic) | grpo | rloo (group baselines over a prompt's samples)
    kl_penalty: str = "reward"  # reward: −β·KL in the rewards | loss: β·KL is a loss term (PPOLoss)

    @classmethod
    def of(cls, cfg) -> "ExperienceConfig":
        """The experience settings of a larger config that has these keys too (PPOConfig)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


class ExperienceMaker:
    """Makes experience batches from the current actor. `reward_model` is an object with
    `score_ids(idx (B, T), end_index (B,)) -> (B,)` (gptlab.align.reward.RewardModel), or pass
    `reward_fn(prompts, responses) -> list[float]` (prompts: the rendered chat text up to and including
    the generation prompt; responses: the sampled text without `<|end|>`)."""

    def __init__(self, actor: GPT, critic: GPT, ref: GPT, tokenizer: Tokenizer, cfg: ExperienceConfig, *,
                 reward_model=None, reward_fn: RewardFn | None = None, autocast=None):
        if (reward_model is None) == (reward_fn is None):
            raise ValueError("pass exactly one of reward_model and reward_fn")
        self.actor, self.critic, self.ref, self.tok, self.cfg = actor, critic, ref, tokenizer, cfg
        self.reward_model, self.reward_fn = reward_model, reward_fn
        self.autocast = autocast or contextlib.nullcontext
        self.end_id = tokenizer.special_tokens[END]
        self.pad_id = tokenizer.eot_id
        self.device = next(actor.parameters()).device
        self.generator = Generator(actor, tokenizer)  # fp32 training weights; never converts them
        # Temperature 1 and no top-k/top-p by default: the KL penalty and the PPO ratio are estimated from
        # these samples as if they came from the policy itself. Samples from a truncated or sharpened
        # distribution are not the policy's, so log π − log π_ref stops being an unbiased KL estimate
        # (tokens outside the top-k never appear, and the estimate can go negative).
        self.params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                     top_k=cfg.top_k, top_p=cfg.top_p, stop_token_ids=(self.end_id,),
                                     ignore_eos=True)  # only <|end|> ends an assistant turn

    # --- 1. sampling -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, conversations: list[list[dict]], seed: int | None = None, num_samples: int = 1):
        """-> (prompt ids, response ids incl. a sampled <|end|>, ended flags, prompt texts, response texts)."""
        prompt_ids = [render_ids(self.tok, c, add_generation_prompt=True)[0] for c in conversations]
        was_training = self.actor.training
        # sampling runs in the actor's own fp32 weights whatever autocast context the caller is in. With a
        # seed (evaluation) the rows draw from a forked global RNG seeded once: independent rows (the
        # generator's per-row seeds would give every prompt the same random stream), and the training
        # RNG state is left untouched.
        forked = [self.device] if self.device.type == "cuda" else []
        with torch.autocast(self.device.type, enabled=False), torch.random.fork_rng(forked, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            outs = self.generator.generate(prompt_ids, self.params, num_samples=num_samples)
        self.actor.train(was_training)
        P = [p for p in prompt_ids for _ in range(num_samples)]
        texts = [render_text(c, add_generation_prompt=True) for c in conversations for _ in range(num_samples)]
        ended = [o.finish_reason == "stop" for o in outs]
        responses = [list(o.token_ids) + ([self.end_id] if e else []) for o, e in zip(outs, ended)]
        return P, responses, ended, texts, [o.text for o in outs]

    # --- 2. scoring ------------------------------------------------------------------------------
    @torch.no_grad()
    def forward_all(self, seq, positions, targets, mask):
        """-> (actor logprobs, ref logprobs, values, exact per-token KL(π‖π_ref), entropy), each (N, R)."""
        out: list[list[torch.Tensor]] = [[], [], [], [], []]
        B = self.cfg.forward_batch_size or seq.size(0)
        t = self.cfg.temperature
        critic = self.critic
        was = self.actor.training, critic is not None and critic.training
        self.actor.eval()
        if critic is not None:
            critic.eval()
        with self.autocast(), unpacked(self.actor):
            for s in range(0, seq.size(0), B):
                x, pos, y = seq[s:s + B], positions[s:s + B], targets[s:s + B]
                logits = response_logits(self.actor, x, pos, t)
                if self.ref is None:  # LoRA: the reference is the actor's frozen base
                    with adapters_off(self.actor):
                        ref_logits = response_logits(self.actor, x, pos, t)
                else:
                    ref_logits = response_logits(self.ref, x, pos, t)
                logp, ref_logp = logits.float().log_softmax(-1), ref_logits.float().log_softmax(-1)
                out[0].append(token_logprobs(logits, y))
                out[1].append(token_logprobs(ref_logits, y))
                out[2].append(critic_values(critic, x, pos) if critic is not None else torch.zeros_like(y, dtype=torch.float))
                out[3].append((logp.exp() * (logp - ref_logp)).sum(-1))
                out[4].append(entropy_from_logits(logits))
        self.actor.train(was[0])
        if critic is not None:
            critic.train(was[1])
        m = mask.float()
        return [torch.cat(o) * m for o in out]

    @torch.no_grad()
    def score(self, seq, end_index, prompt_texts, response_texts) -> torch.Tensor:
        """(N,) raw scores: the reward model at each response's last token, or reward_fn."""
        if self.reward_fn is not None:
            vals = self.reward_fn(prompt_texts, response_texts)
            try:
                vals = [float(v) for v in vals]
            except (TypeError, ValueError):
                raise GptlabError(f"reward_fn must return a list of numbers (one per response), got "
                                  f"{type(vals).__name__}: {str(vals)[:60]}") from None
            if len(vals) != seq.size(0):
                raise GptlabError(f"reward_fn returned {len(vals)} rewards for {seq.size(0)} responses")
            return torch.tensor(vals, device=seq.device)
        B = self.cfg.forward_batch_size or seq.size(0)
        with self.autocast():
            return torch.cat([self.reward_model.score_ids(seq[s:s + B], end_index[s:s + B]).float()
                              for s in range(0, seq.size(0), B)])

    # --- 3. the whole batch ----------------------------------------------------------------------
    def make(self, conversations: list[list[dict]], kl_coef: float, seed: int | None = None,
             num_samples: int = 1) -> Experience:
        t0 = time.perf_counter()
        P, responses, ended, prompt_texts, response_texts = self.sample(conversations, seed, num_samples)
        t1 = time.perf_counter()
        seq, positions, targets, mask = layout(P, responses, self.pad_id, self.device)
        lengths = mask.sum(1)
        end_index = torch.tensor([len(p) for p in P], device=self.device) + lengths - 1  # last response token
        logprobs, ref_logprobs, values, kl_exact, entropy = self.forward_all(seq, positions, targets, mask)
        raw = self.score(seq, end_index, prompt_texts, response_texts)
        ended_t = torch.tensor(ended, dtype=torch.bool, device=self.device)
        scores = raw.clone()
        if self.cfg.missing_end_penalty:
            scores = scores - self.cfg.missing_end_penalty * (~ended_t).float()
        kl = kl_per_token(logprobs, ref_logprobs, self.cfg.kl_estimator) * mask  # (N, R)
        beta = kl_coef if self.cfg.kl_penalty == "reward" else 0.0  # "loss": PPOLoss adds β·KL itself
        rewards = -beta * kl
        rewards[torch.arange(len(P), device=self.device), lengths - 1] += scores
        if self.cfg.advantage == "gae":
            adv, returns = gae(rewards, values, mask, self.cfg.gamma, self.cfg.lam)
            adv = whiten(adv, mask)
        else:  # one advantage per response, from its total reward against its group's (none for one sample)
            adv = torch.zeros_like(rewards) if num_samples < 2 else \
                group_advantages(rewards.sum(1), num_samples, self.cfg.advantage)[:, None] * mask.float()
            returns = torch.zeros_like(adv)
        t2 = time.perf_counter()
        seq_kl = kl.sum(1)
        stats = {"reward_mean": scores.mean().item(), "reward_std": scores.std(unbiased=False).item(),
                 "score_mean": raw.mean().item(), "kl": seq_kl.mean().item(), "kl_exact": kl_exact.sum(1).mean().item(),
                 "kl_coef": float(kl_coef), "rollout_entropy": masked_mean(entropy, mask).item(),
                 "response_length": lengths.float().mean().item(), "ended_fraction": ended_t.float().mean().item(),
                 "time_generate": t1 - t0, "time_score": t2 - t1}
        return Experience(seq, positions, targets, mask, logprobs, ref_logprobs, values, rewards, adv, returns,
                          scores, ended_t, prompt_texts, response_texts, stats)
