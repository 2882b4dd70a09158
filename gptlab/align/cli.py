"""`gptlab sft`, `gptlab reward train|score` and `gptlab dpo`: parsers with set_defaults(func=...)."""

from __future__ import annotations

import argparse
import json
import sys


def _layers(a, *extra: str) -> tuple[dict, dict]:
    """train: and lora: from --config YAML, then the --train.KEY / --lora.KEY flags (the later wins)."""
    from gptlab.config import read_config, section_layer
    from gptlab.stage.lora import LoRAConfig
    from gptlab.train.config import TrainConfig

    y = read_config(a.config, ("train", "lora", *extra))
    return section_layer(a, y, TrainConfig, "train"), section_layer(a, y, LoRAConfig, "lora")


def _common(p: argparse.ArgumentParser, what: str) -> None:
    from gptlab.config import add_dataclass_args
    from gptlab.stage.lora import add_lora_args
    from gptlab.train.config import TrainConfig

    p.add_argument("--from", dest="init_from", metavar="RUN_DIR", help=what)
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--config", help="YAML with train: {...} and lora: {...} sections")
    add_dataclass_args(p, TrainConfig, "train")
    add_lora_args(p)


def cmd_sft(a) -> None:
    from gptlab.align.sft import sft

    from gptlab.config import read_config, section_layer
    from gptlab.model import GPTConfig

    train, lora = _layers(a, "model")
    sft(a.out, a.data, init_from=a.init_from, epochs=a.epochs, pack=a.pack, val_fraction=a.val_fraction,
        train=train, resume=a.resume, skip_empty=a.skip_empty, preset_name=a.preset, tokenizer=a.tokenizer,
        model_overrides=section_layer(a, read_config(a.config, ("train", "lora", "model")), GPTConfig, "model"),
        lora=lora)


def add_sft_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("sft", help="InstructGPT step 1: supervised fine-tuning on demonstrations (chat template, "
                                   "loss on assistant tokens only)")
    p.add_argument("--data", help="demonstrations: JSONL/JSON/CSV rows of {prompt, response}, {messages: [...]}, "
                                  "Alpaca {instruction, input, output} or seed tasks {instruction, instances}")
    p.add_argument("--epochs", type=float, default=None, help="epochs over the data; sets train.max_iters unless given "
                                                              "[default: 3]")
    p.add_argument("--pack", action="store_true", help="pack short examples into full windows (attention crosses "
                                                       "example boundaries; targets do not)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="seeded random validation split [default: 0.05]")
    p.add_argument("--skip-empty", action="store_true", help="drop rows with an empty response instead of failing")
    p.add_argument("--preset", help="instead of --from: random weights of this preset (e.g. an omni model trained "
                                    "on its chat data alone), with --tokenizer")
    p.add_argument("--tokenizer", help="with --preset: a tokenizer file (an omni-data folder's tokenizer.gptlab.json)")
    _common(p, "pretrained run directory to start from")
    from gptlab.config import add_dataclass_args
    from gptlab.model import GPTConfig

    add_dataclass_args(p, GPTConfig, "model", "model options with --preset (--model.KEY VALUE)")
    p.set_defaults(func=cmd_sft)
    return p


def cmd_reward_train(a) -> None:
    from gptlab.align.reward import train_reward

    train, lora = _layers(a)
    train_reward(a.out, a.data, init_from=a.init_from, epochs=a.epochs, heldout_fraction=a.heldout_fraction,
                 train=train, resume=a.resume, reference=a.reference, lora=lora)


def cmd_reward_score(a) -> None:
    from pathlib import Path

    from gptlab.align.data import load_preferences, load_sft_examples
    from gptlab.align.reward import RewardModel
    from gptlab.data.records import read_rows
    from gptlab.fileio import atomic_write

    rm = RewardModel.load(a.run_dir, device=a.device)
    rows = read_rows(a.data)
    records = []
    if any("chosen" in r or "responses" in r for r in rows):
        per, acc, pairs = rm.score_preferences(load_preferences(a.data), batch_size=a.batch_size)
        records = [{"scores": s} for s in per]
        print(f"pairwise accuracy {acc:.4f} over {pairs} pairs against the file's rankings (a tie counts half)",
              file=sys.stderr)
    else:
        convs = load_sft_examples(a.data, skip_empty=True)
        scores = rm.score([c[:-1] for c in convs], [c[-1]["content"] for c in convs], batch_size=a.batch_size)
        records = [{"score": s} for s in scores]
        print(f"mean reward {sum(scores) / len(scores):+.4f} over {len(scores)} responses", file=sys.stderr)
    text = "".join(json.dumps(r) + "\n" for r in records)
    if a.out:
        atomic_write(Path(a.out), lambda p: Path(p).write_text(text))
        print(f"wrote {len(records)} scores to {a.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def add_reward_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("reward", help="InstructGPT step 2: train a reward model on ranked comparisons, or score "
                                      "responses with one")
    rsub = p.add_subparsers(dest="reward_cmd", required=True)
    t = rsub.add_parser("train", help="train a reward model (SFT trunk + scalar head read at <|end|>)")
    t.add_argument("--data", help="preferences: {prompt, responses: [best first]}, {prompt, chosen, rejected} or "
                                  "Anthropic HH {chosen, rejected} dialogues")
    t.add_argument("--epochs", type=float, default=1.0, help="epochs over the prompts [default: 1, as InstructGPT]")
    t.add_argument("--heldout-fraction", type=float, default=0.1, help="held-out prompts for pairwise accuracy")
    t.add_argument("--reference", help="SFT-style file whose responses define reward 0 (the offset) [default: the "
                                       "best-ranked held-out responses]")
    _common(t, "SFT run directory whose trunk the reward model starts from")
    t.set_defaults(func=cmd_reward_train)
    s = rsub.add_parser("score", help="score responses: a preference file (prints pairwise accuracy) or prompt/response rows")
    s.add_argument("run_dir")
    s.add_argument("--data", required=True, help="preference or SFT-style (prompt/response) file")
    s.add_argument("--out", help="JSONL of scores to write [default: stdout]")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_reward_score)
    return p


def cmd_dpo(a) -> None:
    from gptlab.align.dpo import dpo

    train, lora = _layers(a)
    dpo(a.out, a.data, init_from=a.init_from, beta=a.beta, epochs=a.epochs, heldout_fraction=a.heldout_fraction,
        train=train, resume=a.resume, lora=lora)


def add_dpo_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("dpo", help="Direct Preference Optimization from an SFT run on preference pairs")
    p.add_argument("--data", help="preferences (same layouts as `gptlab reward train`)")
    p.add_argument("--beta", type=float, default=0.1, help="β: strength of the implicit KL to the reference [default: 0.1]")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--heldout-fraction", type=float, default=0.1)
    _common(p, "SFT run directory: the starting policy and the frozen reference")
    p.set_defaults(func=cmd_dpo)
    return p


def register(sub) -> None:
    add_sft_parser(sub)
    add_reward_parser(sub)
    add_dpo_parser(sub)
