"""The task format gptlab owns: one small YAML or JSON file per task.

    name: sst2
    type: multiple_choice            # multiple_choice | last_word | generate
    description: "Classify ...\\n\\n"  # prepended once, before the demonstrations (GPT-3's task description)
    template: "Sentence: {sentence}\\nSentiment:"   # a document's fields in {braces} (Python str.format)
    choices: [negative, positive]    # multiple_choice: a list (entries may be templates) or "{field}" holding a list
    target: "{label}"                # the answer: a choice index or a choice's text; for generate a string or a
                                     # list of accepted strings; for last_word the word (default "{last_word}")
    target_kind: auto                # auto | index | text: how a multiple-choice target names its choice
    target_delimiter: " "            # between a prompt and its answer (lm-eval's default)
    fewshot_delimiter: "\\n\\n"        # after each demonstration
    uncond_context: "Answer:"        # optional: also report acc_uncond, GPT-3's ranking by
                                     # log P(choice | prompt) - log P(choice | uncond_context)
    metrics: [acc, acc_norm, f1, mcc]  # optional extras for multiple choice (f1/mcc as GLUE reports them)
    generation: {max_new_tokens: 32, stop: ["\\n"]}   # generate: decoding defaults (SamplingParams fields)
    ignore_case: false               # generate: exact-match normalisation (answers are always stripped)
    ignore_punctuation: false
    text_field: text                 # last_word: the passage; its last word is the target
    data:
      test: data.jsonl               # .jsonl, .json (a list of objects), .tsv or .csv with a header row
      train: train.jsonl             # optional: where demonstrations come from
      test_size: 872                 # optional, without train: hold out this many (or test_fraction) of the
      split_seed: 0                  #   file as the test split, seeded; demonstrations come from the rest

Without train or test_size, demonstrations come from the test file itself, never the example being
evaluated (as lm-eval does when the few-shot split is the test split). last_word documents get two derived
fields: `context` (the passage without its last word) and `last_word`.

Relative data paths resolve against the task file's folder; for the built-in tasks (gptlab/evaluate/builtin)
against the data root (`--data-root`, else $GPTLAB_DATA, else the working directory). `NAME=PATH` points a
task at another data file.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptlab.data.records import read_rows
from gptlab.errors import GptlabError

TASK_TYPES = ("multiple_choice", "last_word", "generate")
BUILTIN_DIR = Path(__file__).with_name("builtin")
MC_METRICS = ("acc", "acc_norm", "acc_uncond", "f1", "mcc")
_TASK_KEYS = {"name", "type", "description", "template", "target", "choices", "target_kind", "target_delimiter",
              "fewshot_delimiter", "uncond_context", "metrics", "generation", "ignore_case", "ignore_punctuation",
              "text_field", "data"}
_DATA_KEYS = {"test", "train", "format", "test_size", "test_fraction", "split_seed"}
_FIELD = re.compile(r"^\{([^{}\[\].!:]+)\}$")


def list_builtin_tasks() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


@dataclass
class Task:
    name: str
    type: str
    template: str
    target: str | None = None
    choices: list[str] | str | None = None
    description: str = ""
    target_kind: str = "auto"
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    uncond_context: str | None = None
    metrics: tuple = ()
    generation: dict = field(default_factory=dict)
    ignore_case: bool = False
    ignore_punctuation: bool = False
    text_field: str = "text"
    data: dict = field(default_factory=dict)
    source: str = "<dict>"  # where the definition came from (for messages)
    base_dir: Path | None = None  # relative data paths resolve here; None: the data root

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>", base_dir: Path | None = None) -> "Task":
        if not isinstance(d, dict):
            raise GptlabError(f"{source}: a task definition is a mapping of keys to values")
        unknown = set(d) - _TASK_KEYS
        if unknown:
            raise GptlabError(f"{source}: unknown task keys {sorted(unknown)} (known: {', '.join(sorted(_TASK_KEYS))})")
        for key in ("name", "type", "template"):
            if not isinstance(d.get(key), str) or not d[key]:
                raise GptlabError(f"{source}: the task needs a '{key}' string")
        if d["type"] not in TASK_TYPES:
            raise GptlabError(f"{source}: task type must be one of {', '.join(TASK_TYPES)}, got {d['type']!r}")
        data = d.get("data") or {}
        if not isinstance(data, dict) or not isinstance(data.get("test"), str):
            raise GptlabError(f"{source}: 'data' needs a 'test' file (and optionally 'train' or 'test_size')")
        if set(data) - _DATA_KEYS:
            raise GptlabError(f"{source}: unknown data keys {sorted(set(data) - _DATA_KEYS)} (known: {', '.join(sorted(_DATA_KEYS))})")
        kw = {k: v for k, v in d.items() if k in _TASK_KEYS}
        kw["metrics"] = tuple(kw.get("metrics") or ())
        if not isinstance(kw.get("generation") or {}, dict):
            raise GptlabError(f"{source}: 'generation' must be a mapping of decoding options")
        kw["generation"] = dict(kw.get("generation") or {})
        task = cls(**kw, source=source, base_dir=base_dir)
        task._check()
        return task

    def _check(self) -> None:
        src = self.source
        if self.type == "multiple_choice":
            if self.choices is None or self.target is None:
                raise GptlabError(f"{src}: a multiple_choice task needs 'choices' and 'target'")
            if isinstance(self.choices, list):
                if len(self.choices) < 2 or not all(isinstance(c, str) for c in self.choices):
                    raise GptlabError(f"{src}: 'choices' must list at least two strings (or name a field)")
            elif not isinstance(self.choices, str):
                raise GptlabError(f"{src}: 'choices' must be a list of strings or a field name")
            bad = set(self.metrics) - set(MC_METRICS)
            if bad:
                raise GptlabError(f"{src}: unknown metrics {sorted(bad)} (multiple choice: {', '.join(MC_METRICS)})")
            if "acc_uncond" in self.metrics and self.uncond_context is None:
                raise GptlabError(f"{src}: acc_uncond needs an 'uncond_context' (e.g. \"Answer:\"; \"\" = the document start)")
        elif self.metrics:
            raise GptlabError(f"{src}: 'metrics' applies to multiple_choice tasks only")
        if self.type == "generate" and self.target is None:
            raise GptlabError(f"{src}: a generate task needs a 'target'")
        if self.type == "last_word" and self.target is None:
            self.target = "{last_word}"
        if self.target_kind not in ("auto", "index", "text"):
            raise GptlabError(f"{src}: target_kind must be auto, index or text")
        for key in ("description", "target_delimiter", "fewshot_delimiter"):
            if not isinstance(getattr(self, key), str):
                raise GptlabError(f"{src}: '{key}' must be a string")
        if self.uncond_context is not None and not isinstance(self.uncond_context, str):
            raise GptlabError(f"{src}: 'uncond_context' must be a string")
        from gptlab.generate import SamplingParams

        known = set(SamplingParams.__dataclass_fields__)
        if set(self.generation) - known:
            raise GptlabError(f"{src}: unknown generation keys {sorted(set(self.generation) - known)}")

    # --- documents -> text ----------------------------------------------------------------------
    def fields(self, doc: dict) -> dict:
        if self.type != "last_word":
            return doc
        text = doc.get(self.text_field)
        if not isinstance(text, str) or " " not in text.strip():
            raise GptlabError(f"{self.name}: a last_word document needs a '{self.text_field}' passage of two or more words")
        context, last = text.rsplit(" ", 1)  # lm-eval's LAMBADA split: on the last space
        return {**doc, "context": context, "last_word": last}

    def _format(self, template: str, f: dict, what: str) -> str:
        try:
            return template.format_map(f)
        except KeyError as e:
            raise GptlabError(f"{self.name}: the {what} template uses field {e} that a document lacks "
                              f"(fields: {', '.join(map(str, f))})") from None
        except (IndexError, ValueError, AttributeError, TypeError) as e:
            raise GptlabError(f"{self.name}: cannot render the {what} template {template!r}: {e}") from None

    def _value(self, spec: Any, f: dict, what: str) -> Any:
        """A "{field}" spec yields the field's raw value (a list, an int); anything else renders as text."""
        if isinstance(spec, str):
            m = _FIELD.match(spec)
            if m and m.group(1) in f:
                return f[m.group(1)]
            if m is None and spec.isidentifier() and spec in f and what == "choices":
                return f[spec]
            return self._format(spec, f, what)
        return spec

    def render(self, doc: dict) -> str:
        return self._format(self.template, self.fields(doc), "prompt")

    def choice_texts(self, doc: dict) -> list[str]:
        f = self.fields(doc)
        if isinstance(self.choices, list):
            return [self._format(c, f, "choice") for c in self.choices]
        v = self._value(self.choices, f, "choices")
        if not isinstance(v, list) or not v or not all(isinstance(c, str) for c in v):
            raise GptlabError(f"{self.name}: the choices field must hold a non-empty list of strings, got {v!r}")
        return v

    def gold(self, doc: dict) -> int:
        """Index of the right choice of a multiple-choice document."""
        choices = self.choice_texts(doc)
        v = self._value(self.target, self.fields(doc), "target")
        idx = None
        if isinstance(v, bool):
            v = int(v)
        if self.target_kind in ("auto", "text") and isinstance(v, str) and v in choices:
            idx = choices.index(v)
        elif self.target_kind in ("auto", "index") and isinstance(v, int):
            idx = v
        elif self.target_kind in ("auto", "index") and isinstance(v, str) and re.fullmatch(r"\s*\d+\s*", v):
            idx = int(v)
        if idx is None or not 0 <= idx < len(choices):
            raise GptlabError(f"{self.name}: target {v!r} is not a choice index or text (choices: {choices})")
        return idx

    def targets(self, doc: dict) -> list[str]:
        """Accepted answers of a generate / last_word document (a list field gives several)."""
        v = self._value(self.target, self.fields(doc), "target")
        vals = v if isinstance(v, list) else [v]
        if not vals or not all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in vals):
            raise GptlabError(f"{self.name}: target must be a string or a list of strings, got {v!r}")
        return [str(x) for x in vals]

    def answer_text(self, doc: dict) -> str:
        """The answer a demonstration shows."""
        if self.type == "multiple_choice":
            return self.choice_texts(doc)[self.gold(doc)]
        return self.targets(doc)[0]

    # --- data -----------------------------------------------------------------------------------
    def resolve(self, path: str, data_root: str | Path | None = None) -> Path:
        p = Path(os.path.expanduser(path))
        if p.is_absolute():
            return p
        base = self.base_dir if self.base_dir is not None else Path(data_root or os.environ.get("GPTLAB_DATA") or ".")
        return base / p

    def splits(self, data_root: str | Path | None = None) -> tuple[list[dict], list[dict], bool]:
        """(test docs, demonstration pool, whether the pool is the test split itself)."""
        d = self.data
        fmt = d.get("format")
        test = read_records(self._existing(d["test"], data_root), fmt)
        if d.get("train"):
            return test, read_records(self._existing(d["train"], data_root), fmt), False
        size, frac = d.get("test_size"), d.get("test_fraction")
        if size is None and frac is None:
            return test, test, True
        n = len(test)
        try:
            m = int(size) if size is not None else round(float(frac) * n)
            split_seed = int(d.get("split_seed", 0))
        except (TypeError, ValueError):
            raise GptlabError(f"{self.name}: data.test_size, test_fraction and split_seed must be numbers") from None
        if not 0 < m < n:
            raise GptlabError(f"{self.name}: cannot hold out {m} of {n} examples as the test split")
        order = random.Random(split_seed).sample(range(n), n)
        held = set(order[:m])
        return [r for i, r in enumerate(test) if i in held], [r for i, r in enumerate(test) if i not in held], False

    def check_data(self, data_root: str | Path | None = None) -> None:
        """Fail early (before a model loads) when a data file is missing."""
        for key in ("test", "train"):
            if self.data.get(key):
                self._existing(self.data[key], data_root)

    def _existing(self, path: str, data_root) -> Path:
        p = self.resolve(path, data_root)
        if not p.is_file():
            how = ("pass --data-root DIR (or set GPTLAB_DATA) or " if self.base_dir is None else "") + \
                  f"use --task {self.name}=PATH"
            raise GptlabError(f"task {self.name}: data file {p} not found: {how}")
        return p


def read_records(path: str | Path, fmt: str | None = None) -> list[dict]:
    """Rows of a .jsonl / .json / .tsv / .csv file as dicts: the one reader of gptlab.data.records."""
    return read_rows(path, fmt)


def load_task(spec: str | Path | dict) -> Task:
    """A task from a built-in name, a YAML/JSON file, a dict, or `NAME_OR_FILE=DATA_PATH` (another test file)."""
    if isinstance(spec, dict):
        return Task.from_dict(spec)
    spec = str(spec)
    override = None
    if not Path(spec).is_file() and "=" in spec:
        spec, override = spec.split("=", 1)
    path = Path(spec)
    if path.is_file():
        task = Task.from_dict(_read_definition(path), str(path), path.resolve().parent)
    elif (BUILTIN_DIR / f"{spec}.yaml").is_file():
        task = Task.from_dict(_read_definition(BUILTIN_DIR / f"{spec}.yaml"), f"builtin task {spec}", None)
    else:
        raise GptlabError(f"unknown task {spec!r}: not a task file, nor a built-in ({', '.join(list_builtin_tasks())})")
    if override:
        # another test file is evaluated whole: the built-in's train file and hold-out split no longer apply
        drop = {"train", "format", "test_size", "test_fraction", "split_seed"}
        task.data = {k: v for k, v in task.data.items() if k not in drop} | {"test": override}
        task.base_dir = Path.cwd()  # a path given on the command line is relative to where it was typed
    return task


def _read_definition(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GptlabError(f"cannot read task file {path}: {e}") from None
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise GptlabError(f"{path}: not JSON ({e})") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise GptlabError(f"{path}: not YAML ({str(e).splitlines()[0]})") from None
