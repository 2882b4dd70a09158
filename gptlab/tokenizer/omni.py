"""The one vocabulary of an omni model: a text tokenizer's ids, then the image codec's codes, then the audio
codec's codes, then the span markers <|image|> <|/image|> <|audio|> <|/audio|> (Chameleon's and AnyGPT's
layout: every modality is tokens of one sequence). Text encoding never yields a marker or a code: only
`encode_image` / `encode_audio` do, so user text cannot forge an image or a voice.

Saved as one self-contained tokenizer file (kind "omni": the text tokenizer and both codecs inside), so every
command that loads the run decodes all of its modalities."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gptlab.errors import GptlabError
from gptlab.tokenizer.base import AllowedSpecial, Codec, Tokenizer, _KINDS, as_id_list

MARKERS = {"image": ("<|image|>", "<|/image|>"), "audio": ("<|audio|>", "<|/audio|>")}
MARKER_TOKENS = [t for pair in MARKERS.values() for t in pair]


class OmniTokenizer(Tokenizer):
    kind = "omni"

    def __init__(self, text: Tokenizer, image: Codec | None, audio: Codec | None, extra_special: dict[str, int] | None = None):
        if image is None and audio is None:
            raise GptlabError("an omni tokenizer needs an image or an audio codec")
        self.text, self.codecs = text, {"image": image, "audio": audio}
        start = text.vocab_size
        self.offsets: dict[str, int] = {}
        for name in ("image", "audio"):  # code ranges follow the text ids
            self.offsets[name] = start
            start += self.codecs[name].n_codes if self.codecs[name] else 0
        self.markers = {t: start + i for i, t in enumerate(MARKER_TOKENS)}
        self._n = start + len(MARKER_TOKENS)
        self.extra = dict(extra_special or {})
        if self.extra and min(self.extra.values()) < self._n:
            raise GptlabError(f"added special tokens must come after id {self._n - 1}")
        self._n = max([self._n - 1, *self.extra.values()]) + 1

    # --- vocabulary ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._n

    @property
    def special_tokens(self) -> dict[str, int]:
        return {**self.text.special_tokens, **self.markers, **self.extra}

    def code_range(self, modality: str) -> range:
        codec = self.codecs.get(modality)
        if codec is None:
            raise GptlabError(f"this model has no {modality} tokenizer (it cannot take or give {modality})")
        return range(self.offsets[modality], self.offsets[modality] + codec.n_codes)

    def has(self, modality: str) -> bool:
        return modality == "text" or self.codecs.get(modality) is not None

    # --- encode / decode ----------------------------------------------------------------------
    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        allowed = self._allowed(allowed_special) & set(self.text.special_tokens)  # never a marker
        return self.text.encode(text, allowed)

    def encode_media(self, modality: str, item: np.ndarray) -> list[int]:
        """An image or a 16 kHz waveform -> [open marker, codes..., close marker] in this vocabulary."""
        r = self.code_range(modality)
        codes = self.codecs[modality].encode(item)
        open_, close = MARKERS[modality]
        return [self.markers[open_], *(r.start + c for c in codes), self.markers[close]]

    def decode_media(self, modality: str, ids: Sequence[int]) -> np.ndarray:
        """Code ids of this vocabulary (no markers) -> the image or waveform."""
        r = self.code_range(modality)
        return self.codecs[modality].decode([i - r.start for i in as_id_list(ids)])

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Text ids as text; markers as their text; codes as nothing (`split_reply` turns spans into media)."""
        out, run = [], []
        names = {v: k for k, v in {**self.markers, **self.extra}.items()}
        for i in as_id_list(ids):
            if i < self.text.vocab_size:
                run.append(i)
                continue
            if run:
                out.append(self.text.decode_bytes(run))
                run = []
            if i in names:
                out.append(names[i].encode())
        if run:
            out.append(self.text.decode_bytes(run))
        return b"".join(out)

    # --- persistence --------------------------------------------------------------------------
    def _with_special_map(self, special_tokens: dict[str, int]) -> "OmniTokenizer":
        own = set(self.text.special_tokens) | set(self.markers)
        return OmniTokenizer(self.text, self.codecs["image"], self.codecs["audio"],
                             {k: v for k, v in special_tokens.items() if k not in own})

    def _fields(self) -> dict[str, Any]:
        return {"text": self.text.to_dict(), "extra_special": self.extra,
                **{m: (c.to_dict() if c else None) for m, c in self.codecs.items()}}

    @classmethod
    def _from_fields(cls, d: dict[str, Any]) -> "OmniTokenizer":
        def part(x, want):
            if x is None:
                return None
            obj = _KINDS[x["kind"]]._from_fields(x)
            if not isinstance(obj, want):
                raise GptlabError(f"the omni tokenizer's part is a {x['kind']}, not a {want.__name__}")
            return obj

        return cls(part(d["text"], Tokenizer), part(d.get("image"), Codec), part(d.get("audio"), Codec),
                   {k: int(v) for k, v in (d.get("extra_special") or {}).items()})
