"""PPO's loop, one named step at a time, with the state it carries in one dataclass (`PPOLoop`):

- rollout: once per iteration, an experience batch: sample responses to rollout_prompts prompts, score
  them (reward model or reward_fn, minus the missing-end penalty, −β·KL per token), advantages and returns
  (GAE, whitened) — `ExperienceMaker.make`; the KL controller then updates β;
- update: ppo_epochs passes over the batch in shuffled minibatches, one engine step each (`batch`);
- log: the iteration's rollout statistics (printed) and each step's loss statistics (`metrics`);
- evaluate: seeded samples on the held-out prompts (`evaluate`, also before training).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptlab.align.experience import Experience, ExperienceMaker
from gptlab.align.ppo_config import PPOConfig
from gptlab.align.ppo_loss import PPOLoss
from gptlab.fileio import atomic_write_json
from gptlab.plot import Line, Panel, plot
from gptlab.stage import EpochOrder
from gptlab.train.metrics import read_metrics

STATE_FILE = "ppo_state.json"


@dataclass
class PPOLoop:
    cfg: PPOConfig
    maker: ExperienceMaker
    kl_ctl: object  # FixedKLController | AdaptiveKLController
    loss: PPOLoss
    train_prompts: list[list[dict]]
    eval_prompts: list[list[dict]]
    out: Path
    device: torch.device
    state: dict = field(default_factory=lambda: {"kl_coef": {}})  # β at the start of each iteration (resume)
    ptx_data: object = None  # a TokenData for PPO-ptx
    quiet: bool = False
    iteration: int = -1
    exp: Experience | None = None
    step_start: float = 0.0
    final_samples: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.order = EpochOrder(len(self.train_prompts), self.cfg.seed)
        self.micro = self.cfg.micro_batch_size or self.cfg.minibatch_size

    # --- rollout -----------------------------------------------------------------------------------
    def rollout(self, it: int) -> Experience:
        """Iteration it's experience batch (made once; β as the saved state says, so a resume replays it)."""
        if self.iteration == it:
            return self.exp
        cfg, kl = self.cfg, self.state["kl_coef"]
        if str(it) in kl:
            self.kl_ctl.value = kl[str(it)]
        kl[str(it)] = self.kl_ctl.value
        self.loss.kl_coef = self.kl_ctl.value  # GRPO's KL loss term uses the iteration's β too
        idx = self.order.indices(it, slice(0, cfg.rollout_prompts), cfg.rollout_prompts)
        exp = self.maker.make([self.train_prompts[i] for i in idx], self.kl_ctl.value, num_samples=cfg.samples_per_prompt)
        self.kl_ctl.update(exp.stats["kl"], cfg.rollout_size)
        kl[str(it + 1)] = self.kl_ctl.value
        atomic_write_json(self.out / STATE_FILE, self.state)
        self.iteration, self.exp = it, exp
        self.log(it, exp)
        return exp

    # --- update ------------------------------------------------------------------------------------
    def batch(self, step: int, sl: slice, n_global: int):
        """The engine's batch function: this step's minibatch rows of the current experience (+ ptx windows)."""
        cfg = self.cfg
        it, j = divmod(step, cfg.steps_per_iteration)
        exp = self.rollout(it)
        if sl.start == 0:
            self.step_start = time.perf_counter()
        epoch, mbi = divmod(j, cfg.rollout_size // cfg.minibatch_size)
        g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + it * 1009 + epoch) % (1 << 62))
        rows = torch.randperm(cfg.rollout_size, generator=g)[mbi * cfg.minibatch_size:(mbi + 1) * cfg.minibatch_size][sl]
        ptx = None
        if self.ptx_data is not None:
            n = cfg.ptx_batch_size * (n_global // self.micro)
            m0 = sl.start // self.micro * cfg.ptx_batch_size
            ptx = self.ptx_data.get_batch(step, n, self.maker.actor.cfg.block_size, cfg.seed,
                                          sample_slice=slice(m0, m0 + cfg.ptx_batch_size), device=self.device)
        return exp.select(rows), ptx

    # --- log ---------------------------------------------------------------------------------------
    def log(self, it: int, exp: Experience) -> None:
        self.loss.extra = {**exp.stats, "iteration": it}
        if not self.quiet:
            s = exp.stats
            print(f"iteration {it}: reward {s['reward_mean']:+.4f} ± {s['reward_std']:.4f} · KL {s['kl']:.4f} · "
                  f"length {s['response_length']:.1f} · generate {s['time_generate']:.1f}s score {s['time_score']:.1f}s")

    def metrics(self) -> dict:
        """The engine's metrics_fn: this step's PPO statistics and its training time."""
        return {**self.loss.metrics(), "time_train": time.perf_counter() - self.step_start}

    # --- evaluate ----------------------------------------------------------------------------------
    def evaluate(self, model: torch.nn.Module, final: bool) -> dict:
        if not self.eval_prompts:
            return {}
        m, s = evaluate_policy(self.maker, self.eval_prompts, self.cfg, self.kl_ctl.value)
        if final:
            self.final_samples = s
        return m


# --- held-out evaluation and plots --------------------------------------------------------------------------------------
def evaluate_policy(maker: ExperienceMaker, convs: list[list[dict]], cfg: PPOConfig,
                    kl_coef: float) -> tuple[dict, list]:
    """Seeded samples on the held-out prompts (the training sampling settings) -> (metrics, samples)."""
    exp = maker.make(convs, kl_coef, seed=cfg.eval_seed, num_samples=cfg.eval_samples)
    s = exp.stats
    metrics = {"eval_reward": s["reward_mean"], "eval_score": s["score_mean"], "eval_kl": s["kl"],
               "eval_kl_exact": s["kl_exact"], "eval_response_length": s["response_length"],
               "eval_ended_fraction": s["ended_fraction"]}
    samples = [{"prompt": p, "response": r, "reward": round(float(x), 4)}
               for p, r, x in zip(exp.prompts, exp.responses, exp.scores.tolist())][:cfg.show_samples]
    return metrics, samples


def plot_ppo(metrics_path: Path, out_dir: Path, before: dict | None = None) -> list[Path]:
    """reward.png and kl.png: per experience batch (rollouts) and on the held-out prompts (step 0 = before)."""
    recs = read_metrics(metrics_path)
    evals = ([{"step": 0, **before}] if before else []) + [r for r in recs if "eval_reward" in r]
    paths = []
    for name, key, ekey, ylabel in (("reward.png", "reward_mean", "eval_reward", "reward"),
                                    ("kl.png", "kl", "eval_kl", "KL(actor‖ref), nats per response")):
        lines = [Line.of(recs, key, f"rollouts: {key}"), Line.of(evals, ekey, f"held-out: {ekey}", "o-", 1.5)]
        png = plot(out_dir / name, [Panel(lines, ylabel=ylabel)], f"{out_dir.name}: PPO {ylabel.split(',')[0]}")
        paths += [png] if png else []
    return paths


