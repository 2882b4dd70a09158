"""Optional moderation of inputs and outputs: a blocklist file and/or a gptlab classifier run.

- Inputs (prompts, chat messages) that hit the blocklist or that the classifier flags are refused (400,
  code "content_filter").
- Outputs are checked as they stream. A blocklisted term is redacted ("[redacted]") or, with
  action "refuse", the choice ends there with finish_reason "content_filter". Text that could still
  grow into a term is held back, so a streamed term is never shown in part. The classifier judges a
  choice's whole text when it ends: a flagged choice ends with finish_reason "content_filter" (and a
  non-streamed one loses its text; streamed text already sent cannot be recalled).

Blocklist file: one term per line, `#` starts a comment; matching is case-insensitive on whole words
(a term that starts/ends with a letter or digit does not match inside a longer word).
Every action is counted in /metrics and logged.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from gptlab.errors import GptlabError

log = logging.getLogger("gptlab.serve")
REDACTED = "[redacted]"
FLAG_LABELS = ("unsafe", "harmful", "toxic", "flagged", "blocked", "offensive")


def read_blocklist(path: Path) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise GptlabError(f"cannot read moderation blocklist {path}: {e}") from None
    terms = [ln.split("#", 1)[0].strip() for ln in lines]
    terms = [t for t in terms if t]
    if not terms:
        raise GptlabError(f"moderation blocklist {path} has no terms")
    return terms


def _pattern(terms: list[str]) -> re.Pattern:
    parts = []
    for t in sorted(set(terms), key=len, reverse=True):
        left = r"(?<!\w)" if re.match(r"\w", t[0]) else ""
        right = r"(?!\w)" if re.match(r"\w", t[-1]) else ""
        parts.append(left + re.escape(t) + right)
    return re.compile("|".join(parts), re.IGNORECASE)


class Classifier:
    """A fine-tuned classification run (gptlab finetune); `flagged(text)` is True when the flag label's
    probability reaches the threshold."""

    def __init__(self, run_dir: Path, label: str | None = None, threshold: float = 0.5):
        from gptlab.finetune.predict import task_of
        from gptlab.run import load_run

        self.run = load_run(run_dir)
        task = task_of(self.run)
        if task["type"] != "classification":
            raise GptlabError(f"moderation classifier {run_dir} is a {task['type']} run; "
                              "it must be a classification run")
        labels = list(task.get("labels") or [])
        if label is None:
            label = next((x for x in labels if str(x).lower() in FLAG_LABELS), None)
            if label is None:
                raise GptlabError(f"moderation classifier {run_dir}: none of its labels {labels} looks like a flag "
                                  f"({', '.join(FLAG_LABELS)}); name one with --moderation-label")
        if label not in labels:
            raise GptlabError(f"moderation label {label!r} is not one of the classifier's labels {labels}")
        self.label, self.threshold = label, threshold

    def flagged(self, texts: list[str]) -> bool:
        from gptlab.finetune.predict import predict

        texts = [t for t in texts if t.strip()]
        return bool(texts) and any(p.probs[self.label] >= self.threshold for p in predict(self.run, texts))


@dataclass
class Hit:
    source: str  # "blocklist" or "classifier"
    detail: str


class Moderator:
    def __init__(self, blocklist: list[str] | None = None, classifier: Classifier | None = None,
                 action: str = "redact"):
        if action not in ("redact", "refuse"):
            raise GptlabError(f"moderation action must be 'redact' or 'refuse', got {action!r}")
        self.terms = [t.casefold() for t in blocklist or []]
        self.pattern = _pattern(blocklist) if blocklist else None
        self.classifier, self.action = classifier, action
        self.max_term = max((len(t) for t in self.terms), default=0)

    @classmethod
    def from_paths(cls, paths, action: str = "redact", label: str | None = None, threshold: float = 0.5) -> "Moderator":
        """Each path is a blocklist file or a classifier run directory."""
        terms, clf = [], None
        for p in [paths] if isinstance(paths, (str, Path)) else paths:
            p = Path(p)
            if p.is_dir():
                if clf is not None:
                    raise GptlabError("only one moderation classifier run may be given")
                clf = Classifier(p, label, threshold)
            else:
                terms += read_blocklist(p)
        return cls(terms, clf, action)

    def check_input(self, texts: list[str]) -> Hit | None:
        if self.pattern is not None:
            for t in texts:
                m = self.pattern.search(t)
                if m:
                    return Hit("blocklist", m.group(0))
        if self.classifier is not None and self.classifier.flagged(texts):
            return Hit("classifier", self.classifier.label)
        return None

    def output_filter(self) -> "OutputFilter | None":
        return OutputFilter(self) if self.pattern is not None else None

    def flag_output(self, text: str) -> bool:
        return self.classifier is not None and self.classifier.flagged([text])


class OutputFilter:
    """Streaming blocklist filter for one choice: feed text deltas, get safe text back."""

    def __init__(self, mod: Moderator):
        self.mod, self.buf, self.hits = mod, "", 0

    def _held(self, rest: str) -> int:
        """Length of the longest tail of `rest` that is, or may still grow into, a blocked term."""
        for k in range(min(self.mod.max_term, len(rest)), 0, -1):
            tail = rest[-k:].casefold()
            if any(t.startswith(tail) for t in self.mod.terms):
                return k
        return 0

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        """-> (text safe to show now, stop): stop is True when action is "refuse" and a term appeared."""
        self.buf += text
        matches = list(self.mod.pattern.finditer(self.buf))
        if not final:  # a match touching the end may still extend (a longer term, a word character after it)
            matches = [m for m in matches if m.end() < len(self.buf)]
        if matches and self.mod.action == "refuse":
            out, self.buf = self.buf[:matches[0].start()], ""
            self.hits += 1
            return out, True
        out, end = "", 0
        for m in matches:
            out += self.buf[end:m.start()] + REDACTED
            end = m.end()
            self.hits += 1
        rest = self.buf[end:]
        keep = 0 if final else self._held(rest)
        out += rest[:len(rest) - keep]
        self.buf = rest[len(rest) - keep:]
        return out, False
