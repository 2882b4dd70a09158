"""`gptlab convert`: Hugging Face checkpoint dir <-> gptlab run dir. Wired into gptlab.cli."""

from __future__ import annotations

import argparse

from gptlab.errors import GptlabError


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    c = subparsers.add_parser(
        "convert", help="import a Hugging Face GPT-2/GPT-1 checkpoint, or export a run to one",
        description="gptlab convert --from-hf HF_DIR OUT [--tokenizer gpt2|PATH]  |  gptlab convert --to-hf RUN_DIR OUT")
    way = c.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", metavar="HF_DIR", help="HF dir with config.json + model.safetensors/pytorch_model.bin")
    way.add_argument("--to-hf", metavar="RUN_DIR", help="gptlab run directory to export")
    c.add_argument("out", help="directory to create (a run dir for --from-hf, an HF dir for --to-hf)")
    c.add_argument("--tokenizer", metavar="gpt2|PATH", help="with --from-hf: 'gpt2' or a gptlab tokenizer file, instead of the HF "
                                       "dir's vocab.json + merges.txt (required for GPT-1)")
    c.set_defaults(func=cmd_convert)
    return c


def cmd_convert(args) -> None:
    from gptlab.interop.hf import export_hf, import_hf

    if args.from_hf:
        out = import_hf(args.from_hf, args.out, tokenizer=args.tokenizer)
        print(f"imported {args.from_hf} -> gptlab run {out}")
    else:
        if args.tokenizer:
            raise GptlabError("--tokenizer applies to --from-hf only; --to-hf exports the run's own tokenizer")
        out = export_hf(args.to_hf, args.out)
        print(f"exported {args.to_hf} -> Hugging Face dir {out}")


def register(sub) -> None:
    add_convert_parser(sub)
