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
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from gptlab.align.experience import Experience, ExperienceConfig, ExperienceMaker
from gptlab.align.losses import AdaptiveKLController, FixedKLController
from gptlab.align.ppo_config import PPOConfig
from gptlab.align.ppo_loss import ActorCritic, PPOLoss
from gptlab.chat.template import CHAT_TOKENS, ensure_chat_tokens, render_ids, truncate_history
from gptlab.errors import GptlabError
from gptlab.stage import NO_DROPOUT, EpochOrder, begin, load_pretrained
from gptlab.model import GPT
from gptlab.run import load_run, write_run_config
from gptlab.runtime import TRAIN_DTYPES, autocast, dtype_name, linear_shape, resolve_dtype
from gptlab.train import distributed as D
from gptlab.run.format import save_model
from gptlab.fileio import atomic_write_json, read_json
from gptlab.train.config import TrainConfig
from gptlab.train.engine import Trainer
from gptlab.plot import Line, Panel, plot
from gptlab.train.metrics import read_metrics

__all__ = ["PPOConfig", "ActorCritic", "PPOLoss", "ppo", "evaluate_policy", "plot_ppo", "resolve_reward_fn"]

STATE_FILE, SUMMARY_FILE = "ppo_state.json", "ppo_summary.json"


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


def resolve_reward_fn(spec) -> Callable | None:
    """A callable, or 'module:function' (imported) -> the callable."""
    if spec is None or callable(spec):
        return spec
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


def _as_conversations(prompts) -> list[list[dict]]:
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


def _fit_prompts(tok, convs: list[list[dict]], block_size: int, max_new: int) -> tuple[list[list[dict]], int]:
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


# --- evaluation --------------------------------------------------------------------------------------
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


# --- the stage -----------------------------------------------------------------------------------------
def _load_models(actor_from, reward_from, critic_from, reference_from, cfg: PPOConfig, device):
    torch.manual_seed(cfg.seed)  # new embedding rows / a new value head: identical on resume
    actor, tok = load_pretrained(actor_from, NO_DROPOUT)  # dropout off: the ratio needs eval == train forward
    # one compute dtype for the stage (rollouts and training); frozen models take it too unless set
    shape = linear_shape(actor, (cfg.micro_batch_size or cfg.minibatch_size) * actor.cfg.block_size)
    train_dtype = resolve_dtype(cfg.dtype, device, shape, allowed=TRAIN_DTYPES)
    frozen_dtype = train_dtype if cfg.frozen_dtype == "auto" else resolve_dtype(cfg.frozen_dtype, device, shape)
    if not all(t in tok.special_tokens for t in CHAT_TOKENS):
        warnings.warn(f"{actor_from} has no chat tokens (not an SFT run?); adding them with random embeddings",
                      stacklevel=3)
    tok = ensure_chat_tokens(tok, actor)
    if reference_from is None or Path(reference_from).resolve() == Path(actor_from).resolve():
        ref = copy.deepcopy(actor)
    else:
        ref, rtok = load_pretrained(reference_from, NO_DROPOUT)  # (dropout rates would fail the cfg check)
        if rtok.to_dict() != tok.to_dict() or ref.cfg != actor.cfg:
            raise GptlabError(f"the reference {reference_from} differs from the policy {actor_from} in tokenizer or "
                              "architecture; PPO's KL needs the same vocabulary")
    ref = _frozen(ref, frozen_dtype).to(device)
    src = critic_from or reward_from
    if src is not None:
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
        critic = copy.deepcopy(actor)
        critic.add_head("scalar", 1, 0.0)
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
        _no_dropout(m)
    return actor.to(device), critic.to(device), ref, rm, tok, (train_dtype, frozen_dtype)


def ppo(out_dir: str | Path, prompts=None, *, actor_from: str | Path | None = None,
        reward_from: str | Path | None = None, reward_fn: Callable | str | None = None,
        critic_from: str | Path | None = None, config: PPOConfig | dict | None = None, resume: bool = False,
        quiet: bool = False, reference_from: str | Path | None = None) -> dict:
    """PPO from the SFT run `actor_from` against the reward model `reward_from` or `reward_fn(prompts,
    responses) -> list[float]` (a callable or 'module:function'; prompts are the rendered chat text) ->
    {"reward_before", "reward_after", "kl_before", "kl_after", "samples_before", "samples_after", "step", ...},
    measured on held-out prompts with the training sampling settings. The KL reference is `actor_from`
    itself unless `reference_from` names another run (e.g. the SFT run when PPO continues an earlier PPO
    policy, as `gptlab rlhf` does)."""
    st = begin(out_dir, "ppo", resume)
    out, saved = st.out, st.saved
    if resume:
        init = saved.get("init", {})
        actor_from = actor_from or init.get("actor_from")
        reward_from = reward_from or init.get("reward_from")
        critic_from = critic_from or init.get("critic_from")
        reference_from = reference_from or init.get("reference_from")
        prompts = prompts if prompts is not None else init.get("prompts")
        if reward_fn is None and init.get("reward_fn"):
            if init["reward_fn"] == "<callable>":
                raise GptlabError(f"{out} was trained with a Python reward_fn; pass it again to resume")
            reward_fn = init["reward_fn"]
        given = config.to_dict() if isinstance(config, PPOConfig) else dict(config or {})
        fixed = ("rollout_prompts", "samples_per_prompt", "ppo_epochs", "minibatch_size", "micro_batch_size", "seed",
                 "eval_prompts")
        changed = [k for k in fixed if k in given and given[k] != saved["ppo"].get(k)]
        if changed:
            raise GptlabError(f"--resume: {', '.join(changed)} cannot change in a run being resumed")
        cfg = PPOConfig.from_dict({**saved["ppo"], **given})
    else:
        cfg = config if isinstance(config, PPOConfig) else PPOConfig.from_dict(config)
    if actor_from is None:
        raise GptlabError("ppo needs --from RUN_DIR (the SFT policy)")
    if (reward_from is None) == (reward_fn is None):
        raise GptlabError("ppo needs exactly one of --reward RUN_DIR (a reward model) and --reward-fn module:function")
    if prompts is None:
        raise GptlabError("ppo needs --prompts (a prompt file)")
    reward_spec = None if reward_fn is None else (reward_fn if isinstance(reward_fn, str) else "<callable>")
    reward_fn = resolve_reward_fn(reward_fn)

    info, device = D.init_distributed(cfg.device)
    if info.enabled:
        raise GptlabError("gptlab ppo runs in one process; run it without torchrun")
    actor, critic, ref, rm, tok, (train_dtype, frozen_dtype) = _load_models(actor_from, reward_from, critic_from,
                                                                            reference_from, cfg, device)
    ctx = actor.cfg.block_size
    if cfg.max_new_tokens >= ctx:
        raise GptlabError(f"ppo: max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in a context of {ctx}")

    # --- prompts: held-out eval split ------------------------------------------------------------
    convs, dropped = _fit_prompts(tok, _as_conversations(prompts), ctx, cfg.max_new_tokens)
    if isinstance(cfg.eval_prompts, str):
        train_c, (eval_c, d2) = convs, _fit_prompts(tok, _as_conversations(cfg.eval_prompts), ctx, cfg.max_new_tokens)
        dropped += d2
    else:
        k = int(cfg.eval_prompts)
        if k and len(convs) <= k:
            raise GptlabError(f"{len(convs)} prompts are too few to hold out {k} for evaluation (set eval_prompts)")
        perm = torch.randperm(len(convs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        train_c, eval_c = [convs[i] for i in sorted(perm[k:])], [convs[i] for i in sorted(perm[:k])]
    if not train_c:
        raise GptlabError("no usable prompts (all too long for the context with max_new_tokens of room)")

    # --- engine config ---------------------------------------------------------------------------
    spi = cfg.steps_per_iteration
    micro = cfg.micro_batch_size or cfg.minibatch_size
    tcfg = TrainConfig(recipe="ppo", max_iters=cfg.iterations * spi, batch_size=micro,
                       grad_accum=cfg.minibatch_size // micro, lr=cfg.actor_lr, schedule="constant", warmup_iters=0,
                       warmup_tokens=0, decay_tokens=0, batch_warmup_tokens=0, weight_decay=cfg.weight_decay,
                       beta1=0.9, beta2=0.95, grad_clip=cfg.grad_clip, dtype=dtype_name(train_dtype), device=cfg.device,
                       seed=cfg.seed, eval_interval=cfg.eval_every * spi, log_interval=1,
                       checkpoint_interval=cfg.checkpoint_every * spi, keep_last=cfg.keep_last)
    amp = lambda: autocast(device, train_dtype)  # noqa: E731
    ecfg = ExperienceConfig.of(cfg)
    maker = ExperienceMaker(actor, critic, ref, tok, ecfg, reward_model=rm, reward_fn=reward_fn, autocast=amp)
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target
              else FixedKLController(cfg.kl_coef))
    state = read_json(out / STATE_FILE, "ppo state") if resume and (out / STATE_FILE).exists() else {"kl_coef": {}}

    write_run_config(out, actor.cfg, tok, stage="ppo", ppo=cfg.to_dict(),
                     init={"actor_from": str(Path(actor_from).resolve()),
                           "reward_from": str(Path(reward_from).resolve()) if reward_from else None,
                           "critic_from": str(Path(critic_from).resolve()) if critic_from else None,
                           "reference_from": str(Path(reference_from).resolve()) if reference_from else None,
                           "reward_fn": reward_spec,
                           "prompts": str(Path(prompts).resolve()) if isinstance(prompts, (str, Path)) else None},
                     data={"n_train_prompts": len(train_c), "n_eval_prompts": len(eval_c), "n_dropped": dropped})
    if not quiet:
        print(f"ppo: actor {actor.num_params() / 1e6:.2f}M + critic {critic.num_params() / 1e6:.2f}M trained "
              f"({dtype_name(train_dtype)}); reference{' + reward model' if rm else ''} frozen in {dtype_name(frozen_dtype)}; "
              f"reward {'model ' + str(reward_from) if rm else 'function ' + str(reward_spec)}")
        print(f"data: {len(train_c)} train / {len(eval_c)} eval prompts"
              + (f" ({dropped} too long, skipped)" if dropped else "")
              + f" · {cfg.iterations} iterations × {cfg.rollout_size} rollouts · {spi} steps each "
              f"({cfg.ppo_epochs} epochs × {cfg.rollout_size // cfg.minibatch_size} minibatches) on {device}")

    # --- before -----------------------------------------------------------------------------------
    before_path = out / "eval_before.json"
    if resume and before_path.exists():
        before = read_json(before_path, "eval before")
    else:
        m, s = evaluate_policy(maker, eval_c, cfg, kl_ctl.value) if eval_c else ({}, [])
        before = {"metrics": m, "samples": s}
        atomic_write_json(before_path, before)
    if not quiet and before["metrics"]:
        bm = before["metrics"]
        print(f"before: held-out reward {bm['eval_reward']:+.4f} · KL {bm['eval_kl']:.4f}")

    # --- the loop ----------------------------------------------------------------------------------
    loss = PPOLoss(cfg)
    order = EpochOrder(len(train_c), cfg.seed)
    ptx_data = None
    if cfg.ptx_coef > 0:
        from gptlab.data.loader import TokenData

        ptx_data = TokenData(cfg.ptx_data)
        if ptx_data.vocab_size > actor.cfg.vocab_size:
            raise GptlabError(f"ptx_data {cfg.ptx_data} has {ptx_data.vocab_size} token ids; the actor has "
                              f"{actor.cfg.vocab_size}")
    current: dict = {"iteration": -1, "exp": None}

    def experience_for(it: int) -> Experience:
        if current["iteration"] != it:
            if str(it) in state["kl_coef"]:
                kl_ctl.value = state["kl_coef"][str(it)]
            state["kl_coef"][str(it)] = kl_ctl.value
            idx = order.indices(it, slice(0, cfg.rollout_prompts), cfg.rollout_prompts)
            exp = maker.make([train_c[i] for i in idx], kl_ctl.value, num_samples=cfg.samples_per_prompt)
            kl_ctl.update(exp.stats["kl"], cfg.rollout_size)
            state["kl_coef"][str(it + 1)] = kl_ctl.value
            atomic_write_json(out / STATE_FILE, state)
            current.update(iteration=it, exp=exp)
            loss.extra = {**exp.stats, "iteration": it}
            if not quiet:
                print(f"iteration {it}: reward {exp.stats['reward_mean']:+.4f} ± {exp.stats['reward_std']:.4f} · "
                      f"KL {exp.stats['kl']:.4f} · length {exp.stats['response_length']:.1f} · "
                      f"generate {exp.stats['time_generate']:.1f}s score {exp.stats['time_score']:.1f}s")
        return current["exp"]

    step_start = {"t": time.perf_counter()}

    def batch_fn(step: int, sl: slice, n_global: int):
        it, j = divmod(step, spi)
        exp = experience_for(it)
        if sl.start == 0:
            step_start["t"] = time.perf_counter()
        per_epoch = cfg.rollout_size // cfg.minibatch_size
        epoch, mbi = divmod(j, per_epoch)
        g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + it * 1009 + epoch) % (1 << 62))
        perm = torch.randperm(cfg.rollout_size, generator=g)
        rows = perm[mbi * cfg.minibatch_size:(mbi + 1) * cfg.minibatch_size][sl]
        ptx = None
        if ptx_data is not None:
            T = actor.cfg.block_size
            n = cfg.ptx_batch_size * (n_global // micro)
            m0 = sl.start // micro * cfg.ptx_batch_size
            ptx = ptx_data.get_batch(step, n, T, cfg.seed, sample_slice=slice(m0, m0 + cfg.ptx_batch_size),
                                     device=device)
        return exp.select(rows), ptx

    def metrics_fn() -> dict:
        out_ = loss.metrics()
        out_["time_train"] = time.perf_counter() - step_start["t"]
        return out_

    pair = ActorCritic(actor, critic, cfg.temperature)
    eval_state: dict = {"samples": []}

    def eval_fn(model: torch.nn.Module, final: bool) -> dict:
        if not eval_c:
            return {}
        m, s = evaluate_policy(maker, eval_c, cfg, kl_ctl.value)
        if final:
            eval_state["samples"] = s
        return m

    def export_fn(sd: dict) -> dict:  # the run dir's model.safetensors: the actor alone, a plain GPT
        return {k[len("actor."):]: v for k, v in sd.items() if k.startswith("actor.")}

    n_prompt = sum(len(render_ids(tok, c)[0]) for c in train_c) / len(train_c)
    tokens_per_sample = max(1, round(n_prompt + cfg.max_new_tokens / 2))
    critic_scale = cfg.critic_lr / cfg.actor_lr if cfg.actor_lr > 0 else 1.0
    trainer = Trainer(pair, tcfg, out, batch_fn, tokens_per_sample=tokens_per_sample, loss_fn=loss, eval_fn=eval_fn,
                      device=device, resume=resume, metrics_fn=metrics_fn, export_fn=export_fn,
                      lr_scale=lambda name: critic_scale if name.startswith("critic.") else 1.0)
    result = trainer.fit()
    plot_ppo(out / "metrics.jsonl", out, before["metrics"])
    # the critic as its own run dir (a value model: e.g. to start the next round's critic from)
    write_run_config(out / "critic", critic.cfg, tok, stage="ppo-critic", init={"ppo_run": str(out.resolve())})
    save_model(critic, out / "critic" / "model.safetensors")

    after = {k: result[k] for k in result if k.startswith("eval_")}
    bm = before["metrics"]
    summary = {"reward_before": bm.get("eval_reward"), "reward_after": after.get("eval_reward"),
               "kl_before": bm.get("eval_kl"), "kl_after": after.get("eval_kl"),
               "kl_exact_after": after.get("eval_kl_exact"), "score_before": bm.get("eval_score"),
               "score_after": after.get("eval_score"), "ended_before": bm.get("eval_ended_fraction"),
               "ended_after": after.get("eval_ended_fraction"),
               "samples_before": before["samples"], "samples_after": eval_state["samples"],
               "step": result["step"], "iterations": result["step"] // spi, "run_dir": str(out)}
    atomic_write_json(out / SUMMARY_FILE, summary)
    if not quiet and summary["reward_after"] is not None:
        print(f"done: held-out reward {summary['reward_before']:+.4f} -> {summary['reward_after']:+.4f} · "
              f"KL {summary['kl_after']:.4f} nats · run dir {out} (gptlab chat {out})")
    return {**{k: v for k, v in result.items() if not k.startswith("eval_")}, **summary}

