"""The tokenizer interface and the one on-disk format the project owns (``tokenizer.gptlab.json``).

Every tokenizer maps text <-> ids, carries an ``<|endoftext|>`` special token (documents are joined
with it), and saves itself to a small self-contained JSON file so a checkpoint can always be decoded.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from gptlab.errors import GptlabError

TOKENIZER_FILE = "tokenizer.gptlab.json"
FORMAT = "gptlab-tokenizer"
VERSION = 1
EOT = "<|endoftext|>"

AllowedSpecial = Literal["all"] | Collection[str]

# kind -> class; filled by Tokenizer.__init_subclass__ so load_tokenizer needs no imports of subclasses.
_KINDS: dict[str, type[Tokenizer]] = {}


def as_id_list(ids: Iterable[int]) -> list[int]:
    """Accept lists, tuples, numpy arrays and torch tensors alike (they all have .tolist())."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()  # type: ignore[union-attr]
    return [int(i) for i in ids] if not isinstance(ids, list) else ids


class _Saved(ABC):
    """What every kind in the tokenizer file format shares: a registered ``kind``, JSON fields, ``save``."""

    kind: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            _KINDS[cls.kind] = cls

    @abstractmethod
    def _fields(self) -> dict[str, Any]:
        """Kind-specific JSON fields (everything except format/version/kind)."""

    @classmethod
    @abstractmethod
    def _from_fields(cls, d: dict[str, Any]) -> _Saved:
        """Inverse of ``_fields``; may raise KeyError/TypeError/ValueError on malformed input."""

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "kind": self.kind, **self._fields()}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the tokenizer. A path ending in ``.json`` is the file; anything else is a directory
        (created if needed) that receives ``tokenizer.gptlab.json``. Returns the file written."""
        p = Path(path)
        if p.is_dir() or p.suffix != ".json":
            p = p / TOKENIZER_FILE
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")  # write-then-rename: never leave a half-written file
        tmp.write_text(json.dumps(self.to_dict(), ensure_ascii=True), encoding="utf-8")
        tmp.replace(p)
        return p


class Codec(_Saved):
    """A modality's tokenizer: an item (an image, a waveform) <-> code ids 0..n_codes-1. Learned, saved in
    the tokenizer file format; the omni tokenizer places its codes in the one vocabulary."""

    modality: ClassVar[str]

    @property
    @abstractmethod
    def n_codes(self) -> int:
        """Size of the codebook."""

    @property
    def tokens_per_item(self) -> int | None:
        """A fixed number of codes per item (images), or None (audio: a rate, see ``codes_per_second``)."""
        return None

    @abstractmethod
    def encode(self, item: np.ndarray) -> list[int]:
        """An item in the codec's input layout -> code ids."""

    @abstractmethod
    def decode(self, codes: Sequence[int]) -> np.ndarray:
        """Code ids -> the item they stand for."""

    def code_vectors(self) -> Any:
        """(n_codes, D) what each code stands for (a patch's pixels, a log-mel frame), or None: a new
        model's embedding rows for the codes start from a projection of these, so similar codes start alike."""
        return getattr(self, "codebook", None)


class Tokenizer(_Saved):
    """Text <-> token ids. Subclasses set ``kind`` and implement the abstract methods."""

    # --- vocabulary -------------------------------------------------------------------------
    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (= largest id + 1): the model's embedding rows."""

    @property
    @abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """Special token text -> id (a copy; mutating it changes nothing)."""

    @property
    def eot_id(self) -> int:
        return self.special_tokens[EOT]

    @property
    def token_dtype(self) -> np.dtype:
        """Smallest unsigned dtype for token files: uint16 covers GPT-2's 50,257 ids."""
        return np.dtype(np.uint16 if self.vocab_size <= 65536 else np.uint32)

    def _allowed(self, allowed_special: AllowedSpecial) -> set[str]:
        """Normalise ``allowed_special``; unknown names are an error rather than silently ignored."""
        if allowed_special == "all":
            return set(self.special_tokens)
        if isinstance(allowed_special, str):
            raise GptlabError(f"allowed_special must be 'all' or a set of token strings, got {allowed_special!r}")
        allowed = set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise GptlabError(f"unknown special tokens {sorted(unknown)}; known: {sorted(self.special_tokens)}")
        return allowed

    def with_special_tokens(self, names: Iterable[str]) -> Tokenizer:
        """A NEW tokenizer of the same kind with each missing name appended as a special token after
        the current largest id; existing ids (and names already present) are unchanged."""
        if isinstance(names, str):
            raise GptlabError(f"with_special_tokens takes a list of token strings, got the string {names!r}")
        special, next_id = self.special_tokens, self.vocab_size
        for name in names:
            if not isinstance(name, str) or not name:
                raise GptlabError(f"special token names must be non-empty strings, got {name!r}")
            if name not in special:
                special[name], next_id = next_id, next_id + 1
        return self._with_special_map(special)

    def _with_special_map(self, special_tokens: dict[str, int]) -> Tokenizer:
        """Rebuild with a new special-token map; subclasses may override with a faster path."""
        return self._from_fields({**self._fields(), "special_tokens": special_tokens})

    # --- encode / decode --------------------------------------------------------------------
    @abstractmethod
    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        """Text -> ids. Special-token text is ordinary text unless listed in ``allowed_special``,
        so user text can never inject ``<|endoftext|>`` by accident."""

    def encode_batch(self, texts: Iterable[str], allowed_special: AllowedSpecial = ()) -> list[list[int]]:
        return [self.encode(t, allowed_special) for t in texts]

    @abstractmethod
    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Ids -> raw bytes (a BPE token can hold part of a UTF-8 character)."""

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text; broken UTF-8 (e.g. a sampled partial character) becomes U+FFFD, never an error."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


def load_tokenizer(path: str | os.PathLike[str], expect: type | None = None) -> Tokenizer:
    """Load a ``tokenizer.gptlab.json`` file, or a directory containing one; `expect` (default: a text
    Tokenizer) is the class the file must hold, e.g. ``Codec`` for an image or audio tokenizer."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise GptlabError(f"tokenizer file not found: {p}")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise GptlabError(f"{p}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise GptlabError(f"{p}: not valid JSON (not UTF-8 text)") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise GptlabError(f"{p}: not a gptlab tokenizer file (expected \"format\": \"{FORMAT}\")")
    if d.get("version") != VERSION:
        raise GptlabError(f"{p}: unsupported tokenizer file version {d.get('version')!r} (this gptlab reads {VERSION})")
    kind = d.get("kind")
    if kind not in _KINDS:
        raise GptlabError(f"{p}: unknown tokenizer kind {kind!r} (known: {', '.join(sorted(_KINDS))})")
    want = Tokenizer if expect is None else expect
    if not issubclass(_KINDS[kind], want):
        what = "a text tokenizer" if want is Tokenizer else f"a {want.__name__.lower()}"
        raise GptlabError(f"{p} holds a {kind!r} tokenizer; {what} is needed here")
    try:
        return _KINDS[kind]._from_fields(d)
    except GptlabError as e:
        raise GptlabError(f"{p}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise GptlabError(f"{p}: malformed {kind} tokenizer ({type(e).__name__}: {e})") from None


def check_special_tokens(special_tokens: dict[str, int], n_regular: int) -> dict[str, int]:
    """Special ids must be ints, distinct, outside 0..n_regular-1, and include <|endoftext|>."""
    if not isinstance(special_tokens, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in special_tokens.items()
    ):
        raise GptlabError("special_tokens must map strings to integer ids")
    if EOT not in special_tokens:
        raise GptlabError(f"special_tokens must contain {EOT}")
    ids = list(special_tokens.values())
    if len(set(ids)) != len(ids) or min(ids) < n_regular:
        raise GptlabError(f"special token ids must be distinct and >= {n_regular}, got {special_tokens}")
    return dict(special_tokens)
