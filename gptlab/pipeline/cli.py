"""`gptlab pipeline`: the whole story in one command (parser wired into gptlab/cli.py)."""

from __future__ import annotations

import argparse


def cmd_pipeline(a) -> None:
    from gptlab.pipeline.config import default_yaml, load_pipeline_config
    from gptlab.pipeline.runner import resume_command, run_pipeline

    if a.print_config:
        print(default_yaml(), end="")
        return
    cfg = load_pipeline_config(a.config, a.set, out=a.out)
    run_pipeline(cfg, from_stage=a.from_stage, only=a.only, resume_cmd=resume_command(), serve=a.serve)


def add_pipeline_parser(sub) -> argparse.ArgumentParser:
    from gptlab.pipeline.stages import STAGE_NAMES

    p = sub.add_parser("pipeline", help="raw text → pretrained → evaluated → SFT → reward model → PPO → compressed "
                                        "→ evaluated → chat samples (→ served), cached per stage, with a report",
                       description="Runs every stage in one pipeline directory; re-running skips stages whose config "
                                   "and inputs are unchanged, and resumes an interrupted stage from its checkpoint. "
                                   f"Stages: {', '.join(STAGE_NAMES)}.")
    p.add_argument("--config", help="YAML merged over the embedded default (see --print-config)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one key, e.g. --set pretrain.train.max_iters=200 (repeatable)")
    p.add_argument("--out", help="pipeline directory [default: the config's out, runs/pipeline]")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--from", dest="from_stage", choices=STAGE_NAMES, metavar="STAGE",
                   help="re-run STAGE and every stage after it, whatever the cache says")
    g.add_argument("--only", choices=STAGE_NAMES, metavar="STAGE", help="run just STAGE (its inputs must be done)")
    p.add_argument("--serve", action="store_true", help="serve the final model when done (OpenAI-compatible API)")
    p.add_argument("--print-config", action="store_true", help="print the embedded default config and exit")
    p.set_defaults(func=cmd_pipeline)
    return p


def register(sub) -> None:
    add_pipeline_parser(sub)
