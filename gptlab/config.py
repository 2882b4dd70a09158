"""The one configuration path: typed dataclasses per section, one coercion function, one YAML layout and
`--section.key value` flags for every section, with --help from field metadata.

A command's settings resolve as: the dataclass defaults ← a recipe (training stages) ← the saved run (on
--resume) ← the YAML file's section ← the flags. A YAML file is one mapping for every command:
`{model: {...}, train: {...}, <stage>: {...}}` plus the command's top-level keys (e.g. data, out).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path

import yaml

from gptlab.errors import GptlabError

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
_NONE = {"none", "null", "off"}


def field(default, help: str):
    """A config field with its --help text."""
    return dataclasses.field(default=default, metadata={"help": help})


def parse_value(default, text: str):
    """Parse a CLI string into the type of the field's default."""
    try:
        if isinstance(default, bool):
            low = text.lower()
            if low not in _TRUE | _FALSE:
                raise ValueError(f"expected true/false, got {text!r}")
            return low in _TRUE
        if isinstance(default, int):
            if any(c in text for c in ".eE"):  # 1e4 is an integer, 2.5 is not (no silent rounding)
                try:
                    f = float(text)
                except ValueError:
                    raise ValueError("expected an integer") from None
                if not f.is_integer():
                    raise ValueError("expected an integer")
                return int(f)
            try:
                return int(text)
            except ValueError:
                raise ValueError("expected an integer") from None
        if isinstance(default, float):
            try:
                return float(text)
            except ValueError:
                raise ValueError("expected a number") from None
        if isinstance(default, tuple):
            return tuple(s.strip() for s in text.split(",") if s.strip())
        return text
    except ValueError as e:
        raise GptlabError(f"bad value {text!r}: {e}") from None


def _optional_type(hint) -> type | None:
    """`float | None` -> float; anything else -> None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0]
    return None


def coerce(cls, values: dict, section: str) -> dict:
    """Check keys against a dataclass and coerce values (strings from flags, YAML's `6e-4` read as a string)
    to the fields' types. Optional fields (`float | None`) take 'none'/'null'/'off' for None; `Any` fields
    keep YAML values and read digit strings as ints."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise GptlabError(f"unknown {section} config keys: {', '.join(sorted(unknown))}")
    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in values.items():
        default, hint = fields[k].default, hints.get(k)
        try:
            opt = _optional_type(hint)
            if opt is not None:
                if v is None or (isinstance(v, str) and v.strip().lower() in _NONE):
                    v = None
                else:
                    v = opt(v) if not isinstance(v, str) or opt is str else parse_value(opt(), v)
            elif hint is typing.Any:
                v = int(v) if isinstance(v, str) and v.strip().isdigit() else v
            elif isinstance(default, tuple) and isinstance(v, list):
                v = tuple(v)
            elif isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            elif not isinstance(v, type(default)) or (type(default) is int and isinstance(v, bool)):
                v = parse_value(default, str(v))
        except (GptlabError, TypeError, ValueError) as e:
            raise GptlabError(f"{section}.{k}: {e}") from None
        out[k] = v
    return out


def check_ranges(obj, section: str, rules) -> None:
    """One validation per config dataclass, called from its __post_init__: rules are (key, ok, what it must
    be); numbers must also be finite. The first broken rule is a one-line error naming the key and value."""
    for key, ok, want in rules:
        v = getattr(obj, key)
        if not ok or (isinstance(v, float) and not math.isfinite(v)):
            raise GptlabError(f"{section}.{key} must be {want}, got {v!r}")


def positive_int(text: str) -> int:
    """argparse `type=` for counts that must be ≥ 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {v}")
    return v


def add_dataclass_args(parser: argparse.ArgumentParser, cls, prefix: str, title: str | None = None) -> None:
    """--PREFIX.KEY VALUE for every field of `cls` (unset flags stay out of the namespace)."""
    group = parser.add_argument_group(title or f"{prefix} options (--{prefix}.KEY VALUE)")
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = ",".join(default) if isinstance(default, tuple) else default
        group.add_argument(f"--{prefix}.{f.name}", dest=f"{prefix}.{f.name}", metavar="V", default=argparse.SUPPRESS,
                           help=f"{f.metadata.get('help', '')} [default: {shown}]")


def collect_overrides(args: argparse.Namespace, cls, prefix: str) -> dict:
    """The --PREFIX.KEY flags given on the command line, coerced."""
    given = {f.name: vars(args)[f"{prefix}.{f.name}"] for f in dataclasses.fields(cls) if f"{prefix}.{f.name}" in vars(args)}
    try:
        return coerce(cls, given, prefix)
    except GptlabError as e:
        raise GptlabError(f"--{e}") from None


def load_yaml(path: str | Path | None) -> dict:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise GptlabError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise GptlabError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise GptlabError(f"config file {p} must be a mapping of keys to values")
    return data


def read_config(path: str | Path | None, sections: tuple[str, ...], top: tuple[str, ...] = ()) -> dict:
    """The one YAML layout: `sections` are mappings ({model:, train:, <stage>:}), `top` the command's own
    top-level keys. Anything else is refused with the layout it expected."""
    return check_layout(load_yaml(path), path, sections, top)


def check_layout(y: dict, path, sections: tuple[str, ...], top: tuple[str, ...] = ()) -> dict:
    unknown = set(y) - set(sections) - set(top)
    if unknown:
        layout = ", ".join([*top, *(f"{s}: {{...}}" for s in sections)])
        raise GptlabError(f"{path}: unknown top-level keys {sorted(unknown)} (expected {layout})")
    for s in sections:
        if not isinstance(y.get(s) or {}, dict):
            raise GptlabError(f"{path}: '{s}' must be a mapping of keys to values")
        y[s] = y.get(s) or {}
    return y


def section_layer(args: argparse.Namespace, y: dict, cls, section: str) -> dict:
    """One section's settings from the YAML file, then its --section.KEY flags (the later wins)."""
    return {**coerce(cls, y.get(section) or {}, section), **collect_overrides(args, cls, section)}


def add_dtype_arg(p, default: str = "auto") -> None:
    """--dtype on every command: auto | float32 | bfloat16 | float16, also spelled fp32 / bf16 / fp16."""
    from gptlab.runtime import dtype_arg  # torch is imported only by the commands that use it

    p.add_argument("--dtype", type=dtype_arg(), default=default, metavar="{auto,float32,bfloat16,float16}",
                   help="compute dtype; auto: bf16 where this GPU/CPU runs it natively and faster, else float32 "
                        "(the choice and its reason are printed) [default: %(default)s]")
