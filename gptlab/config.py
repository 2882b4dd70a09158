"""Config = dataclasses + a YAML file + `--section.key value` overrides, with --help from field metadata."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import yaml

from gptlab.errors import GptlabError

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def parse_value(default, text: str):
    """Parse a CLI string into the type of the field's default."""
    try:
        if isinstance(default, bool):
            low = text.lower()
            if low not in _TRUE | _FALSE:
                raise ValueError(f"expected true/false, got {text!r}")
            return low in _TRUE
        if isinstance(default, int):
            return int(float(text)) if any(c in text for c in ".eE") else int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple):
            return tuple(s.strip() for s in text.split(",") if s.strip())
        return text
    except ValueError as e:
        raise GptlabError(f"bad value {text!r}: {e}") from None


def add_dataclass_args(parser: argparse.ArgumentParser, cls, prefix: str) -> None:
    group = parser.add_argument_group(f"{prefix} options (--{prefix}.KEY VALUE)")
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = ",".join(default) if isinstance(default, tuple) else default
        group.add_argument(f"--{prefix}.{f.name}", dest=f"{prefix}.{f.name}", metavar="V", default=argparse.SUPPRESS,
                           help=f"{f.metadata.get('help', '')} [default: {shown}]")


def collect_overrides(args: argparse.Namespace, cls, prefix: str) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}"
        if key in vars(args):
            try:
                out[f.name] = parse_value(f.default, vars(args)[key])
            except GptlabError as e:
                raise GptlabError(f"--{key}: {e}") from None
    return out


def load_yaml(path: str | Path | None) -> dict:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise GptlabError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise GptlabError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise GptlabError(f"config file {p} must be a mapping of keys to values")
    return data


def add_dtype_arg(p, default: str = "auto") -> None:
    """--dtype on every command: auto | float32 | bfloat16 | float16, also spelled fp32 / bf16 / fp16."""
    from gptlab.runtime import dtype_arg  # torch is imported only by the commands that use it

    p.add_argument("--dtype", type=dtype_arg(), default=default, metavar="{auto,float32,bfloat16,float16}",
                   help="compute dtype; auto: bf16 where this GPU/CPU runs it natively and faster, else float32 "
                        "(the choice and its reason are printed) [default: %(default)s]")
