"""`gptlab ppo` and `gptlab rlhf`: parsers with set_defaults(func=...), wired into gptlab/cli.py.

Config: --config YAML with a ppo: {...} section (PPOConfig keys; the older layout with them at the top
level is read too) and, for `rlhf`, reward: {...}; then --ppo.KEY VALUE flags (the later wins)."""

from __future__ import annotations

import argparse
import dataclasses
import json


def _add_ppo_keys(p: argparse.ArgumentParser, section: str = "ppo") -> None:
    from gptlab.align.ppo_config import PPOConfig
    from gptlab.config import add_dataclass_args

    add_dataclass_args(p, PPOConfig, section, f"{section.upper()} options (--{section}.KEY VALUE; 'none' clears an "
                                              "optional one)")


def _ppo_layer(a, y: dict, section: str = "ppo") -> dict:
    from gptlab.align.ppo_config import PPOConfig
    from gptlab.config import section_layer

    return section_layer(a, y, PPOConfig, section)


def _run_rl(a, section: str) -> None:
    """`gptlab ppo` / `gptlab grpo`: the YAML's <section>: and lora:, then the flags."""
    from gptlab.align.ppo import grpo, ppo
    from gptlab.align.ppo_config import PPOConfig
    from gptlab.config import check_layout, load_yaml, section_layer
    from gptlab.stage.lora import LoRAConfig

    y = load_yaml(a.config)
    if section == "ppo" and y and "ppo" not in y and set(y) <= {f.name for f in dataclasses.fields(PPOConfig)}:
        y = {"ppo": y}  # the older layout: PPO keys at the top level
    y = check_layout(y, a.config, (section, "lora"))
    run = ppo if section == "ppo" else grpo
    extra = {"critic_from": a.critic_from} if section == "ppo" else {}
    result = run(a.out, a.prompts, actor_from=a.init_from, reward_from=a.reward, reward_fn=a.reward_fn,
                 reference_from=a.reference_from, config=_ppo_layer(a, y, section), resume=a.resume,
                 lora=section_layer(a, y, LoRAConfig, "lora"), **extra)
    if a.json:
        print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, str, list, type(None)))}))


def cmd_ppo(a) -> None:
    _run_rl(a, "ppo")


def cmd_grpo(a) -> None:
    _run_rl(a, "grpo")


def _add_rl_parser(sub, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help)
    p.add_argument("--from", dest="init_from", metavar="RUN_DIR", help="the SFT run: initial policy and KL reference")
    p.add_argument("--prompts", help="prompt file: .txt (one per line), JSONL/JSON/CSV of {prompt} or {messages} (with "
                                     "\"answer\" for --reward-fn match:MODE), or a preference/SFT file (its prompts)")
    p.add_argument("--out", required=True, help="run directory to write (a normal run dir: `gptlab chat OUT`)")
    r = p.add_mutually_exclusive_group()
    r.add_argument("--reward", metavar="RUN_DIR", help="reward-model run (gptlab reward train)"
                                                       + ("; also the critic's start" if name == "ppo" else ""))
    r.add_argument("--reward-fn", metavar="MODULE:FUNCTION|match:MODE",
                   help="reward_fn(prompts, responses) -> list[float] instead of a reward model (prompts: the rendered "
                        "chat text; responses: the sampled text); or match:exact|number|regex, a verifiable reward: 1 "
                        "when the response matches the prompt row's \"answer\"")
    if name == "ppo":
        p.add_argument("--critic-from", metavar="RUN_DIR",
                       help="start the critic from this run instead [default: the reward model, or the SFT trunk with "
                            "a new value head]")
    p.add_argument("--reference-from", metavar="RUN_DIR", help="KL reference, when not the --from run (e.g. the SFT "
                                                               "run when continuing an earlier policy)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--config", help=f"YAML with {name}: {{...}} (as --{name}.KEY) and lora: {{...}}")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line at the end")
    _add_ppo_keys(p, name)
    from gptlab.stage.lora import add_lora_args

    add_lora_args(p)
    return p


def add_ppo_parser(sub) -> argparse.ArgumentParser:
    p = _add_rl_parser(sub, "ppo", "InstructGPT step 3: PPO against a reward model (or a Python reward function), "
                                   "KL-penalised against the frozen SFT reference")
    p.set_defaults(func=cmd_ppo)
    return p


def add_grpo_parser(sub) -> argparse.ArgumentParser:
    p = _add_rl_parser(sub, "grpo", "GRPO / RLOO: G samples a prompt, each judged against its group (no critic), "
                                    "e.g. with a verifiable reward (--reward-fn match:number)")
    from gptlab.align.ppo_config import GRPO_DEFAULTS

    p.set_defaults(func=cmd_grpo)
    p.epilog = ("GRPO's defaults replace PPO's shown above: " + ", ".join(f"{k}={v}" for k, v in GRPO_DEFAULTS.items())
                + "; --grpo.advantage rloo for RLOO")
    return p


def cmd_rlhf(a) -> None:
    from gptlab.align.rlhf import rlhf
    from gptlab.config import read_config, section_layer
    from gptlab.stage.lora import LoRAConfig

    y = read_config(a.config, ("reward", "ppo", "lora"))
    prefs = a.preferences[0] if len(a.preferences) == 1 else (a.preferences or None)
    rlhf(a.out, sft_from=a.init_from, preferences=prefs, prompts=a.prompts, rounds=a.rounds, reward=y["reward"],
         ppo=_ppo_layer(a, y), judge=a.judge, lora=section_layer(a, y, LoRAConfig, "lora"))


def add_rlhf_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("rlhf", help="repeat InstructGPT steps 2 and 3: rounds of reward-model training and PPO "
                                    "(out/round_N/{reward,ppo}, summary.json)")
    p.add_argument("--from", dest="init_from", metavar="RUN_DIR", required=True, help="the SFT run")
    p.add_argument("--preferences", action="append", default=[],
                   help="preference file for the reward model; repeat for one per round (the last repeats)")
    p.add_argument("--judge", metavar="MODULE:FUNCTION",
                   help="judge(prompt_messages, responses) -> indices best first: rounds after the first (all rounds "
                        "without --preferences) train on fresh comparisons of the current policy's samples")
    p.add_argument("--prompts", required=True, help="PPO prompt file")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", required=True, help="directory for round_1/, round_2/, ... and summary.json")
    p.add_argument("--config", help="YAML with reward: {...} (train_reward keys: epochs, heldout_fraction, train, "
                                    "reference; and init, judge_samples, judge_prompts), ppo: {...} (PPO keys) and "
                                    "lora: {...}")
    _add_ppo_keys(p)
    from gptlab.stage.lora import add_lora_args

    add_lora_args(p)
    p.set_defaults(func=cmd_rlhf)
    return p


def register(sub) -> None:
    add_ppo_parser(sub)
    add_grpo_parser(sub)
    add_rlhf_parser(sub)
