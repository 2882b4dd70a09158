"""`gptlab pretrain`."""

from __future__ import annotations

import argparse

from gptlab.errors import GptlabError


def cmd_pretrain(a) -> None:
    from gptlab.config import read_config, section_layer
    from gptlab.model import GPTConfig
    from gptlab.train.config import TrainConfig
    from gptlab.pretrain import pretrain
    from gptlab.stage.lora import LoRAConfig

    y = read_config(a.config, ("model", "train", "lora"), top=("data", "out", "preset", "recipe", "from"))
    data, out = a.data or y.get("data"), a.out or y.get("out")
    if not data or not out:
        raise GptlabError("pretrain needs --data (a prepared data dir) and --out (the run dir)")
    pretrain(data, out, preset_name=a.preset or y.get("preset"), recipe=a.recipe or y.get("recipe", "nanogpt"),
             model_overrides=section_layer(a, y, GPTConfig, "model"),
             train_layers=(section_layer(a, y, TrainConfig, "train"),), resume=a.resume,
             init_from=a.init_from or y.get("from"), lora=section_layer(a, y, LoRAConfig, "lora"))


def register(sub) -> None:
    from gptlab.config import add_dataclass_args
    from gptlab.model import PRESETS, GPTConfig
    from gptlab.train.config import RECIPES, TrainConfig

    pt = sub.add_parser("pretrain", help="generative pretraining (one process, or several under torchrun)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pt.add_argument("--config", help="YAML with keys data, out, preset, recipe, from, model: {...}, train: {...}, lora: {...}")
    pt.add_argument("--data", help="prepared data directory (gptlab prepare)")
    pt.add_argument("--out", help="run directory")
    pt.add_argument("--preset", help=f"model preset: {', '.join(PRESETS)} [default: small-4x128]")
    pt.add_argument("--recipe", help=f"training recipe: {', '.join(RECIPES)} [default: nanogpt, sized for short runs; "
                                     "gpt1/gpt3 use the papers' schedules, sized for billions of tokens]")
    pt.add_argument("--from", dest="init_from", metavar="RUN_DIR", help="continue pretraining this run's model (its "
                                                                        "weights and tokenizer) on --data")
    pt.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    add_dataclass_args(pt, GPTConfig, "model")
    add_dataclass_args(pt, TrainConfig, "train")
    from gptlab.stage.lora import add_lora_args

    add_lora_args(pt)
    pt.set_defaults(func=cmd_pretrain)
