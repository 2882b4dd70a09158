"""`gptlab` command line: one registry. Each command module has `register(sub)`, which adds its parsers with
`set_defaults(func=cmd_NAME)`; `cmd_NAME(args)` is a thin shell over a library function. Bad input ends in
a one-line `error: ...` and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

from gptlab.errors import GptlabError

# in the order `gptlab --help` lists them: the story from raw text to a served model
COMMAND_MODULES = (
    "gptlab.tokenizer.cli",   # tokenizer
    "gptlab.data.cli",        # prepare
    "gptlab.pretrain.cli",    # pretrain
    "gptlab.generate.cli",    # sample, generate
    "gptlab.chat.cli",        # chat
    "gptlab.interop.cli",     # convert
    "gptlab.evaluate.cli",    # evaluate
    "gptlab.finetune.cli",    # finetune, classify
    "gptlab.compress.cli",    # compress
    "gptlab.align.cli",       # sft, reward, dpo
    "gptlab.align.ppo_cli",   # ppo, grpo, rlhf
    "gptlab.pipeline.cli",    # pipeline
    "gptlab.reproduce.cli",   # reproduce
    "gptlab.serve.cli",       # serve
    "gptlab.run.cli",         # info
    "gptlab.omni.cli",        # omni-data, omni-eval
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptlab", description="The GPT lineage end to end.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except GptlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a write the command did not foresee failing (disk full, read-only): one line, no traceback
        print(f"error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
