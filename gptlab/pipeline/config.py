"""The pipeline's config: the embedded default (default.yaml beside this file), a user YAML merged over it,
and `--set section.key=value` overrides merged over both."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from gptlab.errors import GptlabError

DEFAULT_FILE = Path(__file__).with_name("default.yaml")


@dataclass
class PipelineConfig:
    out: str = "runs/pipeline"           # the pipeline directory: one sub-folder per stage, state.json, report/
    seed: int = 1337
    corpus: str = "shakespeare"          # any `gptlab prepare` source; synthetic alignment data needs play layout
    tokenizer: dict = field(default_factory=dict)
    prepare: dict = field(default_factory=dict)
    pretrain: dict = field(default_factory=dict)
    synth: dict = field(default_factory=dict)
    evaluate: dict = field(default_factory=dict)
    sft: dict = field(default_factory=dict)
    reward: dict = field(default_factory=dict)
    ppo: dict = field(default_factory=dict)
    dpo: dict = field(default_factory=dict)
    compress: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)
    serve: dict = field(default_factory=dict)

    def section(self, name: str) -> dict:
        return copy.deepcopy(getattr(self, name))

    def to_dict(self) -> dict:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}


def _merge(base: dict, over: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, f"{where}.{k}")
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read(path: Path) -> dict:
    try:
        y = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise GptlabError(f"cannot read pipeline config {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(y, dict):
        raise GptlabError(f"{path}: a pipeline config is a mapping of sections (out, corpus, pretrain, sft, ...)")
    return y


def parse_set(items: list[str]) -> dict:
    """`a.b.c=value` pairs (value parsed as YAML: numbers, true/false, lists) -> nested dict."""
    out: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise GptlabError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. pretrain.train.max_iters=200")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        d = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = value
    return out


def load_pipeline_config(path: str | Path | None = None, sets: list[str] | None = None,
                         out: str | None = None) -> PipelineConfig:
    merged = _read(DEFAULT_FILE)
    if path:
        p = Path(path)
        if not p.is_file():
            raise GptlabError(f"pipeline config not found: {p}")
        merged = _merge(merged, _read(p), str(p))
    merged = _merge(merged, parse_set(sets or []), "--set")
    if out:
        merged["out"] = out
    known = {f.name for f in fields(PipelineConfig)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise GptlabError(f"unknown pipeline config sections {unknown}; known: {sorted(known)}")
    for name in known - {"out", "seed", "corpus"}:
        if not isinstance(merged.get(name) or {}, dict):
            raise GptlabError(f"pipeline config: '{name}' must be a mapping, got {merged[name]!r}")
        merged[name] = merged.get(name) or {}
    return PipelineConfig(**merged)


def default_yaml() -> str:
    return DEFAULT_FILE.read_text(encoding="utf-8")
