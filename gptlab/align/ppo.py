"""InstructGPT step 3 (`gptlab ppo`): optimise the SFT policy against a reward with PPO, a frozen
reference keeping it close (per-token reward −β·KL(actor‖ref), the score at the last token).

Four models. The actor (from the SFT run, trained) and the critic (from the reward model: its scalar head
gives one value per token; from the SFT trunk with a new scalar head when there is no reward model) are
one `ActorCritic` module trained by the one engine (`Trainer`: checkpoints, bit-exact resume,
metrics.jsonl, NaN stop) with one AdamW (critic lr via a param-group scale). The reward model and the
reference are frozen: no grad, `frozen_dtype` weights (auto: the compute dtype); with `reward_fn` there is no reward model.
Dropout is off in the actor and critic: it would make the recomputed log-probs differ from the sampler's.

Schedule: iteration k = one experience batch (`ExperienceMaker`, rollout_prompts × samples_per_prompt
responses) then ppo_epochs passes over it in minibatches; each engine step is one minibatch. The batch
function makes the next experience batch when the current one's epochs × minibatches are used up.
Checkpoints fall on iteration boundaries and sampling uses the checkpointed global RNG, so a resumed run
regenerates exactly the experience the original would have. The run dir is a normal run dir holding the
actor (`gptlab chat OUT` works); the critic is written to OUT/critic/ at the end.
"""

from __future__ import annotations

import copy
import importlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from gptlab.align.experience import ExperienceConfig, ExperienceMaker
from gptlab.align.losses import AdaptiveKLController, FixedKLController
from gptlab.align.ppo_config import GRPO_DEFAULTS, PPOConfig
from gptlab.align.ppo_loop import STATE_FILE, PPOLoop, evaluate_policy, plot_ppo
from gptlab.align.ppo_loss import ActorCritic, PPOLoss
from gptlab.chat.template import CHAT_TOKENS, add_chat_tokens, ensure_chat_tokens, render_ids, truncate_history
from gptlab.errors import GptlabError
from gptlab.fileio import atomic_write, atomic_write_json, read_json, save_tensors
from gptlab.model import GPT
from gptlab.model.lora import has_lora, merged_state
from gptlab.run import load_run, read_run_config, write_run_config
from gptlab.run.format import METRICS_FILE, MODEL_FILE, save_model
from gptlab.runtime import TRAIN_DTYPES, autocast, dtype_name, linear_shape, resolve_dtype
from gptlab.stage import NO_DROPOUT, Start, begin, load_pretrained
from gptlab.stage.lora import LoRAConfig, attach, lora_hooks, resolve_lora
from gptlab.train import distributed as D
from gptlab.train.config import TrainConfig
from gptlab.train.engine import Trainer
from gptlab.run.lock import writes_run_dir

__all__ = ["PPOConfig", "ActorCritic", "PPOLoss", "ppo", "grpo", "evaluate_policy", "plot_ppo", "resolve_reward_fn"]

SUMMARY_FILE = "ppo_summary.json"


def _no_dropout(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    # attention dropout is no nn.Dropout: the attention reads cfg.attn_pdrop (shared with the model's cfg)
    for k in NO_DROPOUT:
        setattr(model.cfg, k, 0.0)


def _frozen(model: GPT, dtype: torch.dtype) -> GPT:
    model = model.to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def resolve_reward_fn(spec, prompts=None) -> Callable | None:
    """A callable, 'match:MODE' (the prompt rows' answers checked, gptlab.align.verify), or 'module:function'
    (imported) -> the callable."""
    if spec is None or callable(spec):
        return spec
    if str(spec).startswith("match:"):
        from gptlab.align.verify import answer_reward

        return answer_reward(prompts, str(spec).removeprefix("match:"))
    mod, _, fn = str(spec).partition(":")
    if not mod or not fn:
        raise GptlabError(f"expected module:function, got {spec!r}")
    try:
        obj = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise GptlabError(f"cannot import {spec}: {e}") from None
    if not callable(obj):
        raise GptlabError(f"{spec} is not callable")
    return obj


def as_conversations(prompts) -> list[list[dict]]:
    from gptlab.align.data import load_prompts

    if isinstance(prompts, (str, Path)):
        return load_prompts(prompts)
    if isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts):
        return [[{"role": "user", "content": p}] for p in prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(p, list) for p in prompts):
        return [list(p) for p in prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(p, dict) for p in prompts):
        return load_prompts(prompts)
    raise GptlabError("prompts must be a prompt file, a list of strings or a list of conversations")


def fit_prompts(tok, convs: list[list[dict]], block_size: int, max_new: int) -> tuple[list[list[dict]], int]:
    """Drop the oldest turns of prompts too long to leave max_new_tokens of room; skip those that cannot fit."""
    out, dropped = [], 0
    for c in convs:
        if len(render_ids(tok, c)[0]) + max_new > block_size:  # (bad input raises here, with its message)
            try:
                c = truncate_history(tok, c, block_size, reserve=max_new)
            except GptlabError:
                dropped += 1
                continue
        out.append(c)
    return out, dropped


# --- the stage -----------------------------------------------------------------------------------------
def _load_models(actor_from, reward_from, critic_from, reference_from, cfg: PPOConfig, device,
                 lcfg: LoRAConfig | None = None):
    lcfg = lcfg or LoRAConfig()
    torch.manual_seed(cfg.seed)  # new embedding rows / a new value head: identical on resume
    actor, tok = load_pretrained(actor_from, NO_DROPOUT)  # dropout off: the ratio needs eval == train forward
    # one compute dtype for the stage (rollouts and training); frozen models take it too unless set
    shape = linear_shape(actor, (cfg.micro_batch_size or cfg.minibatch_size) * actor.cfg.block_size)
    train_dtype = resolve_dtype(cfg.dtype, device, shape, allowed=TRAIN_DTYPES)
    frozen_dtype = train_dtype if cfg.frozen_dtype == "auto" else resolve_dtype(cfg.frozen_dtype, device, shape)
    if not all(t in tok.special_tokens for t in CHAT_TOKENS):
        warnings.warn(f"{actor_from} has no chat tokens (not an SFT run?); adding them with random embeddings",
                      stacklevel=3)
    tok, new_tokens = add_chat_tokens(tok, actor)
    attach(actor, lcfg, new_tokens)  # QLoRA: quantized now, before any other model is loaded
    if reference_from is None or Path(reference_from).resolve() == Path(actor_from).resolve():
        # with LoRA the reference is the actor with its adapters off: no second copy of the weights
        ref = None if lcfg.enabled else copy.deepcopy(actor)
    else:
        ref, rtok = load_pretrained(reference_from, NO_DROPOUT)  # (dropout rates would fail the cfg check)
        if rtok.to_dict() != tok.to_dict() or ref.cfg != actor.cfg:
            raise GptlabError(f"the reference {reference_from} differs from the policy {actor_from} in tokenizer or "
                              "architecture; PPO's KL needs the same vocabulary")
    ref = None if ref is None else _frozen(ref, frozen_dtype).to(device)
    src = critic_from or reward_from
    if not cfg.has_critic:  # GRPO / RLOO: the group of samples is the baseline
        critic = None
    elif src is not None:
        run = load_run(Path(src))
        critic = run.model.float()
        if critic.cfg.head != "scalar":  # a trunk without a value head: add one
            critic, ctok = load_pretrained(src, NO_DROPOUT)
            ctok = ensure_chat_tokens(ctok, critic)
            critic.add_head("scalar", 1, 0.0)
        else:
            ctok = run.tokenizer
        if ctok.to_dict() != tok.to_dict():
            raise GptlabError(f"the critic's run {src} has a different tokenizer than the actor's {actor_from}; "
                              "train the reward model from the SFT run")
    else:  # no reward model: the critic is the SFT trunk with a new scalar head
        if lcfg.enabled:  # the actor's base is frozen (and maybe quantized) under its adapters: load it again
            critic, ctok = load_pretrained(actor_from, NO_DROPOUT)
            add_chat_tokens(ctok, critic)
        else:
            critic = copy.deepcopy(actor)
        critic.add_head("scalar", 1, 0.0)
    if critic is not None:
        critic.train()
    rm = None
    if reward_from is not None:
        from gptlab.align.reward import RewardModel

        rm = RewardModel.load(reward_from, device=device, dtype=frozen_dtype)
        if rm.tokenizer.to_dict() != tok.to_dict():
            raise GptlabError(f"the reward model {reward_from} uses a different tokenizer than the policy {actor_from}")
        for p in rm.model.parameters():
            p.requires_grad_(False)
    for m in (actor, critic):
        if m is not None:
            _no_dropout(m)
    if critic is not None:  # the critic's adapters: the actor's settings, over its own base
        attach(critic, lcfg, new_tokens if src is None else [], quiet=True)
        critic = critic.to(device)
    return actor.to(device), critic, ref, rm, tok, (train_dtype, frozen_dtype)


@dataclass
class Sources:
    """Where a PPO run's models and prompts come from (saved in config.json, read back on --resume)."""
    actor_from: str | Path | None
    reward_from: str | Path | None
    reward_fn: Callable | str | None
    critic_from: str | Path | None
    reference_from: str | Path | None
    prompts: object

    def record(self, reward_spec) -> dict:
        res = lambda p: str(Path(p).resolve()) if p else None  # noqa: E731
        return {"actor_from": res(self.actor_from), "reward_from": res(self.reward_from),
                "critic_from": res(self.critic_from), "reference_from": res(self.reference_from),
                "reward_fn": reward_spec, "prompts": res(self.prompts) if isinstance(self.prompts, (str, Path)) else None}


def _settings(st: Start, src: Sources, config) -> tuple[Sources, PPOConfig]:
    """The sources and config: given, or read back from the run being resumed (the settings that shape
    the experience batches cannot change there)."""
    if not st.resume:
        return src, config if isinstance(config, PPOConfig) else PPOConfig.from_dict(config)
    init = st.saved.get("init", {})
    reward_fn = src.reward_fn
    if reward_fn is None and init.get("reward_fn"):
        if init["reward_fn"] == "<callable>":
            raise GptlabError(f"{st.out} was trained with a Python reward_fn; pass it again to resume")
        reward_fn = init["reward_fn"]
    src = Sources(src.actor_from or init.get("actor_from"), src.reward_from or init.get("reward_from"), reward_fn,
                  src.critic_from or init.get("critic_from"), src.reference_from or init.get("reference_from"),
                  src.prompts if src.prompts is not None else init.get("prompts"))
    given = config.to_dict() if isinstance(config, PPOConfig) else dict(config or {})
    fixed = ("rollout_prompts", "samples_per_prompt", "ppo_epochs", "minibatch_size", "micro_batch_size", "seed",
             "eval_prompts")
    changed = [k for k in fixed if k in given and given[k] != st.saved["ppo"].get(k)]
    if changed:
        raise GptlabError(f"--resume: {', '.join(changed)} cannot change in a run being resumed")
    return src, PPOConfig.from_dict({**st.saved["ppo"], **given})


def _split_prompts(tok, prompts, cfg: PPOConfig, ctx: int) -> tuple[list, list, int]:
    """-> (training prompts, held-out prompts, prompts dropped as too long for the context)."""
    convs, dropped = fit_prompts(tok, as_conversations(prompts), ctx, cfg.max_new_tokens)
    if isinstance(cfg.eval_prompts, str):
        eval_c, d2 = fit_prompts(tok, as_conversations(cfg.eval_prompts), ctx, cfg.max_new_tokens)
        train_c, dropped = convs, dropped + d2
    else:
        k = int(cfg.eval_prompts)
        if k and len(convs) <= k:
            raise GptlabError(f"{len(convs)} prompts are too few to hold out {k} for evaluation (set eval_prompts)")
        perm = torch.randperm(len(convs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        train_c, eval_c = [convs[i] for i in sorted(perm[k:])], [convs[i] for i in sorted(perm[:k])]
    if not train_c:
        raise GptlabError("no usable prompts (all too long for the context with max_new_tokens of room)")
    return train_c, eval_c, dropped


def _engine_config(cfg: PPOConfig, dtype: torch.dtype) -> TrainConfig:
    """One engine step per minibatch; checkpoints and evals on iteration boundaries."""
    spi, micro = cfg.steps_per_iteration, cfg.micro_batch_size or cfg.minibatch_size
    return TrainConfig(recipe="ppo", max_iters=cfg.iterations * spi, batch_size=micro,
                       grad_accum=cfg.minibatch_size // micro, lr=cfg.actor_lr, schedule="constant", warmup_iters=0,
                       warmup_tokens=0, decay_tokens=0, batch_warmup_tokens=0, weight_decay=cfg.weight_decay,
                       beta1=0.9, beta2=0.95, grad_clip=cfg.grad_clip, dtype=dtype_name(dtype), device=cfg.device,
                       seed=cfg.seed, eval_interval=cfg.eval_every * spi, log_interval=1,
                       checkpoint_interval=cfg.checkpoint_every * spi, keep_last=cfg.keep_last)


def _ptx_data(cfg: PPOConfig, actor: GPT):
    if cfg.ptx_coef <= 0:
        return None
    from gptlab.data.loader import TokenData

    data = TokenData(cfg.ptx_data)
    if data.vocab_size > actor.cfg.vocab_size:
        raise GptlabError(f"ptx_data {cfg.ptx_data} has {data.vocab_size} token ids; the actor has {actor.cfg.vocab_size}")
    return data


@writes_run_dir()
def ppo(out_dir: str | Path, prompts=None, *, actor_from: str | Path | None = None,
        reward_from: str | Path | None = None, reward_fn: Callable | str | None = None,
        critic_from: str | Path | None = None, config: PPOConfig | dict | None = None, resume: bool = False,
        quiet: bool = False, reference_from: str | Path | None = None, lora: dict | None = None,
        stage: str = "ppo") -> dict:
    """PPO from the SFT run `actor_from` against the reward model `reward_from` or `reward_fn(prompts,
    responses) -> list[float]` (a callable or 'module:function'; prompts are the rendered chat text) ->
    {"reward_before", "reward_after", "kl_before", "kl_after", "samples_before", "samples_after", "step", ...},
    measured on held-out prompts with the training sampling settings. The KL reference is `actor_from`
    itself unless `reference_from` names another run (e.g. the SFT run when PPO continues an earlier PPO
    policy, as `gptlab rlhf` does). With config advantage grpo / rloo there is no critic (`grpo`)."""
    st = begin(out_dir, stage, resume)
    lcfg = resolve_lora(st, lora)
    src, cfg = _settings(st, Sources(actor_from, reward_from, reward_fn, critic_from, reference_from, prompts), config)
    if src.actor_from is None:
        raise GptlabError("ppo needs --from RUN_DIR (the SFT policy)")
    if (src.reward_from is None) == (src.reward_fn is None):
        raise GptlabError("ppo needs exactly one of --reward RUN_DIR (a reward model) and --reward-fn module:function")
    if src.prompts is None:
        raise GptlabError("ppo needs --prompts (a prompt file)")
    reward_spec = None if src.reward_fn is None else (src.reward_fn if isinstance(src.reward_fn, str) else "<callable>")
    reward_callable = resolve_reward_fn(src.reward_fn, src.prompts)

    ctx = read_run_config(Path(src.actor_from))["model"]["block_size"]  # checked before anything is loaded
    if cfg.max_new_tokens >= ctx:
        raise GptlabError(f"ppo: max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in a context of {ctx}")
    info, device = D.init_distributed(cfg.device)
    if info.enabled:
        raise GptlabError("gptlab ppo runs in one process; run it without torchrun")
    actor, critic, ref, rm, tok, (train_dtype, frozen_dtype) = _load_models(
        src.actor_from, src.reward_from, src.critic_from, src.reference_from, cfg, device, lcfg)
    lora_section = getattr(actor, "lora_section", None)
    train_c, eval_c, dropped = _split_prompts(tok, src.prompts, cfg, ctx)
    maker = ExperienceMaker(actor, critic, ref, tok, ExperienceConfig.of(cfg), reward_model=rm,
                            reward_fn=reward_callable, autocast=lambda: autocast(device, train_dtype))
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target else FixedKLController(cfg.kl_coef)
    state = read_json(st.out / STATE_FILE, "ppo state") if resume and (st.out / STATE_FILE).exists() else {"kl_coef": {}}
    st.record(actor.cfg, tok, stage=stage, ppo=cfg.to_dict(), init=src.record(reward_spec),
              data={"n_train_prompts": len(train_c), "n_eval_prompts": len(eval_c), "n_dropped": dropped},
              **({"lora": lora_section} if lora_section else {}))
    if not quiet:
        trained = f"actor {actor.num_params() / 1e6:.2f}M" + (f" + critic {critic.num_params() / 1e6:.2f}M" if critic
                                                               else f" (no critic: {cfg.advantage} group baselines)")
        print(f"{st.stage}: {trained} trained ({dtype_name(train_dtype)}); reference{' + reward model' if rm else ''} "
              f"frozen in {dtype_name(frozen_dtype)}; reward {'model ' + str(src.reward_from) if rm else str(reward_spec)}")
        print(f"data: {len(train_c)} train / {len(eval_c)} eval prompts" + (f" ({dropped} too long, skipped)" if dropped else "")
              + f" · {cfg.iterations} iterations × {cfg.rollout_size} rollouts · {cfg.steps_per_iteration} steps each "
              f"({cfg.ppo_epochs} epochs × {cfg.rollout_size // cfg.minibatch_size} minibatches) on {device}")
    loop = PPOLoop(cfg, maker, kl_ctl, PPOLoss(cfg), train_c, eval_c, st.out, device, state, _ptx_data(cfg, actor), quiet)
    before = _before(loop, resume)
    n_prompt = sum(len(render_ids(tok, c)[0]) for c in train_c) / len(train_c)
    critic_scale = cfg.critic_lr / cfg.actor_lr if cfg.actor_lr > 0 else 1.0
    hooks = lora_hooks(actor, st.out, st.on_checkpoint) or {
        "export_fn": lambda sd: {k[len("actor."):]: v for k, v in sd.items() if k.startswith("actor.")},
        "on_checkpoint": st.on_checkpoint}
    result = Trainer(ActorCritic(actor, critic, cfg.temperature), _engine_config(cfg, train_dtype), st.out, loop.batch,
                     tokens_per_sample=max(1, round(n_prompt + cfg.max_new_tokens / 2)), loss_fn=loop.loss,
                     eval_fn=loop.evaluate, device=device, resume=resume, metrics_fn=loop.metrics,
                     lr_scale=lambda name: critic_scale if name.startswith("critic.") else 1.0, **hooks).fit()
    return _finish(loop, result, before, critic, tok)


def _before(loop: PPOLoop, resume: bool) -> dict:
    """The held-out evaluation before training (kept in the run dir: a resumed run reports the same)."""
    path = loop.out / "eval_before.json"
    if resume and path.exists():
        before = read_json(path, "eval before")
    else:
        m, s = evaluate_policy(loop.maker, loop.eval_prompts, loop.cfg, loop.kl_ctl.value) if loop.eval_prompts else ({}, [])
        before = {"metrics": m, "samples": s}
        atomic_write_json(path, before)
    if not loop.quiet and before["metrics"]:
        print(f"before: held-out reward {before['metrics']['eval_reward']:+.4f} · KL {before['metrics']['eval_kl']:.4f}")
    return before


def _save_critic(critic: GPT, tok, out: Path) -> None:
    """OUT/critic/: the value model as a run of its own (merged, when it trained adapters)."""
    write_run_config(out / "critic", critic.cfg, tok, stage="ppo-critic", init={"ppo_run": str(out.resolve())})
    if has_lora(critic):
        sd = merged_state(critic)
        atomic_write(out / "critic" / MODEL_FILE, lambda p: save_tensors(sd, p, metadata={"format": "gptlab"}))
    else:
        save_model(critic, out / "critic" / MODEL_FILE)


def _finish(loop: PPOLoop, result: dict, before: dict, critic: GPT | None, tok) -> dict:
    """Plots, the critic as its own run dir (a value model, e.g. for the next round), the summary."""
    out = loop.out
    plot_ppo(out / METRICS_FILE, out, before["metrics"])
    if critic is not None:
        _save_critic(critic, tok, out)
    after, bm = {k: result[k] for k in result if k.startswith("eval_")}, before["metrics"]
    summary = {"reward_before": bm.get("eval_reward"), "reward_after": after.get("eval_reward"),
               "kl_before": bm.get("eval_kl"), "kl_after": after.get("eval_kl"),
               "kl_exact_after": after.get("eval_kl_exact"), "score_before": bm.get("eval_score"),
               "score_after": after.get("eval_score"), "ended_before": bm.get("eval_ended_fraction"),
               "ended_after": after.get("eval_ended_fraction"),
               "samples_before": before["samples"], "samples_after": loop.final_samples,
               "step": result["step"], "iterations": result["step"] // loop.cfg.steps_per_iteration, "run_dir": str(out)}
    atomic_write_json(out / SUMMARY_FILE, summary)
    if not loop.quiet and summary["reward_after"] is not None:
        print(f"done: held-out reward {summary['reward_before']:+.4f} -> {summary['reward_after']:+.4f} · "
              f"KL {summary['kl_after']:.4f} nats · run dir {out} (gptlab chat {out})")
    return {**{k: v for k, v in result.items() if not k.startswith("eval_")}, **summary}


def grpo(out_dir: str | Path, prompts=None, *, config: PPOConfig | dict | None = None, resume: bool = False,
         **kw) -> dict:
    """GRPO (or RLOO with config advantage "rloo") from the SFT run `actor_from`: G samples a prompt, each
    judged against its group, no critic, the KL to the reference as a loss term — `ppo` with GRPO_DEFAULTS
    under `config`. Rewards as for `ppo`: reward_fn (a callable, 'module:function' or 'match:MODE' for the
    prompt rows' answers) or a reward model."""
    if not resume:
        config = {**GRPO_DEFAULTS, **(config.to_dict() if isinstance(config, PPOConfig) else dict(config or {}))}
    return ppo(out_dir, prompts, config=config, resume=resume, stage="grpo", **kw)
