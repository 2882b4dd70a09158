"""`gptlab rlhf`: InstructGPT's "steps 2 and 3 can be repeated" — rounds of reward-model training and PPO.

Round r (out/round_r/):
  1. comparisons: the round's preference file — `preferences` is one file (used by every round) or a list
     (file r for round r; the last one repeats) — or, when a `judge` is given, fresh comparisons: K
     responses per prompt sampled from the *current* policy (temperature 1), ranked by
     `judge(prompt, responses) -> ranking` and written to round_r/comparisons.jsonl. `prompt` is the
     conversation (a list of {"role", "content"}), `ranking` a list of indices into `responses`, best
     first (a partial ranking keeps only the listed responses). With both, round 1 uses the file (the
     human comparisons of the SFT policy) and later rounds the judge; with a judge alone every round does.
  2. round_r/reward/: a reward model trained on them (`train_reward`, from the SFT run — as InstructGPT's
     RMs all start from the SFT model — or from the current policy with reward={"init": "policy"}).
  3. round_r/ppo/: PPO from the current policy (round 1: the SFT run) against that reward model, the
     critic starting from it; this round's policy is the next round's start. The KL reference is the SFT
     run in every round, as in InstructGPT (ppo={"reference": "policy"}: the round's starting policy, so
     the penalty bounds each round's step instead of the total drift).

Rewards are measured by each round's own reward model, so reward_before/after compare within a round, not
across rounds. A round that finished (round_r/round.json) is skipped when the command is run again.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import torch

from gptlab.align.ppo import PPOConfig, as_conversations, fit_prompts, resolve_reward_fn
from gptlab.align.ppo import ppo as run_ppo
from gptlab.chat.template import END, render_ids
from gptlab.errors import GptlabError
from gptlab.fileio import atomic_write, atomic_write_json, read_json
from gptlab.run.format import LATEST_FILE
from gptlab.run.lock import writes_run_dir

REWARD_KEYS = ("epochs", "heldout_fraction", "train", "reference", "dropout")
RLHF_KEYS = ("init", "judge_samples", "judge_prompts")


def _round_sources(preferences, rounds: int) -> list:
    if preferences is None:
        return [None] * rounds
    files = list(preferences) if isinstance(preferences, (list, tuple)) and preferences and \
        not isinstance(preferences[0], dict) else [preferences]
    return [files[min(r, len(files) - 1)] for r in range(rounds)]


def _ranking(order, k: int, where: str) -> list[int]:
    try:
        idx = [int(i) for i in order]
    except (TypeError, ValueError):
        raise GptlabError(f"{where}: the judge must return a list of response indices, best first") from None
    if len(set(idx)) != len(idx) or any(not 0 <= i < k for i in idx):
        raise GptlabError(f"{where}: the judge returned {idx}, not distinct indices in 0..{k - 1}")
    return idx


@torch.no_grad()
def judge_comparisons(policy_dir: str | Path, conversations: list[list[dict]], judge: Callable, out_file: Path, *,
                      samples: int = 4, max_new_tokens: int = 64, seed: int = 0, device: str = "cpu") -> int:
    """Sample `samples` responses per prompt from the policy, rank them with the judge, write a preference
    JSONL ({"prompt": [messages], "responses": [best first]}) -> the number of prompts written."""
    from gptlab.generate import Generator, SamplingParams
    from gptlab.run import load_run

    run = load_run(Path(policy_dir), device=device)
    tok = run.tokenizer
    gen = Generator(run.model, tok)
    params = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=(tok.special_tokens[END],), ignore_eos=True,
                            seed=seed)
    # prompts too long for the context lose their oldest turns (as PPO's do), not their first tokens
    conversations = fit_prompts(tok, conversations, run.model.cfg.block_size, max_new_tokens)[0]
    ids = [render_ids(tok, c)[0] for c in conversations]
    outs = gen.generate(ids, params, num_samples=samples)
    rows = []
    for i, conv in enumerate(conversations):
        texts = list(dict.fromkeys(o.text for o in outs[i * samples:(i + 1) * samples]))  # distinct, in order
        if len(texts) < 2:
            continue
        order = _ranking(judge(conv, texts), len(texts), f"judge on prompt {i}")
        if len(order) >= 2:
            rows.append({"prompt": conv, "responses": [texts[j] for j in order]})
    if not rows:
        raise GptlabError("the judge produced no comparisons (every prompt had fewer than two distinct responses)")
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write(out_file, lambda p: Path(p).write_text(text))
    return len(rows)


@writes_run_dir()
def rlhf(out_dir: str | Path, *, sft_from: str | Path, preferences=None, prompts=None, rounds: int = 2,
         reward: dict | None = None, ppo: dict | None = None, judge: Callable | str | None = None,
         quiet: bool = False, lora: dict | None = None) -> dict:
    """Chain `rounds` of reward-model training and PPO into out_dir/round_r/ -> summary (also summary.json).
    `lora`: every reward model and PPO run trains adapters with these settings (each round merges its own)."""
    from gptlab.align.reward import train_reward

    if rounds < 1:
        raise GptlabError(f"rlhf: rounds must be ≥ 1, got {rounds}")
    if prompts is None:
        raise GptlabError("rlhf needs --prompts (the PPO prompt file)")
    judge = resolve_reward_fn(judge)
    if preferences is None and judge is None:
        raise GptlabError("rlhf needs --preferences (a preference file per round) or --judge module:function")
    reward = dict(reward or {})
    unknown = set(reward) - set(REWARD_KEYS) - set(RLHF_KEYS)
    if unknown:
        raise GptlabError(f"unknown rlhf reward keys: {', '.join(sorted(unknown))} "
                          f"(train_reward's {', '.join(REWARD_KEYS)}, or {', '.join(RLHF_KEYS)})")
    rm_kwargs = {k: reward[k] for k in REWARD_KEYS if k in reward}
    init = reward.get("init", "sft")
    if init not in ("sft", "policy"):
        raise GptlabError(f"rlhf: reward init must be 'sft' or 'policy', got {init!r}")
    ppo_cfg = dict(ppo or {})
    reference = ppo_cfg.pop("reference", "sft")
    if reference not in ("policy", "sft"):
        raise GptlabError(f"rlhf: ppo reference must be 'sft' or 'policy', got {reference!r}")
    pcfg = PPOConfig.from_dict(ppo_cfg)  # checked once, before any training
    convs = as_conversations(prompts)
    sources = _round_sources(preferences, rounds)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy = Path(sft_from)
    summary: dict = {"sft_from": str(policy.resolve()), "rounds": []}
    for r in range(1, rounds + 1):
        rd = out / f"round_{r}"
        done = rd / "round.json"
        if done.exists():
            info = read_json(done, "rlhf round")
            summary["rounds"].append(info)
            policy = Path(info["policy"])
            continue
        rd.mkdir(parents=True, exist_ok=True)
        data = sources[r - 1]
        if judge is not None and (data is None or r > 1):
            rng = random.Random(pcfg.seed + r)
            chosen = rng.sample(convs, min(len(convs), int(reward.get("judge_prompts", 64))))
            data = rd / "comparisons.jsonl"
            n = judge_comparisons(policy, chosen, judge, data, samples=int(reward.get("judge_samples", 4)),
                                  max_new_tokens=pcfg.max_new_tokens, seed=pcfg.seed + r)
            if not quiet:
                print(f"round {r}: {n} judged comparisons of the current policy's samples -> {data}")
        rm_dir = rd / "reward"
        rm = train_reward(rm_dir, str(data) if isinstance(data, Path) else data,
                          init_from=sft_from if init == "sft" else policy, quiet=quiet,
                          resume=(rm_dir / LATEST_FILE).exists(), lora=lora, **rm_kwargs)
        res = run_ppo(rd / "ppo", prompts, actor_from=policy, reward_from=rm_dir, config=pcfg.to_dict(), quiet=quiet,
                      reference_from=sft_from if reference == "sft" else policy,
                      resume=(rd / "ppo" / LATEST_FILE).exists(), lora=lora)
        info = {"round": r, "reward_data": str(data), "reward_run": str(rm_dir),
                "heldout_accuracy": rm.get("heldout_accuracy"), "offset": rm.get("offset"),
                "reward_before": res["reward_before"], "reward_after": res["reward_after"],
                "kl_after": res["kl_after"], "policy": str(rd / "ppo"), "started_from": str(policy),
                "samples_after": res["samples_after"]}
        atomic_write_json(done, info)
        summary["rounds"].append(info)
        policy = rd / "ppo"
    summary["policy"] = str(policy)
    atomic_write_json(out / "summary.json", summary)
    if not quiet:
        f = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731  (None: no held-out prompts)
        for info in summary["rounds"]:
            print(f"round {info['round']}: RM held-out accuracy {info['heldout_accuracy']} · reward "
                  f"{f(info['reward_before'], '+.4f')} -> {f(info['reward_after'], '+.4f')} · "
                  f"KL {f(info['kl_after'], '.4f')}")
        print(f"final policy: {policy}")
    return summary
