"""What an omni model adds to the server, in OpenAI's conventions: image_url and input_audio content parts in,
`modalities: ["text", "audio"]` + `audio: {"format": "wav"|"pcm16"}` out (message.audio with id, base64 data
and transcript; streamed as delta.audio chunks), and image replies when "image" is among the modalities
(message.images: [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}], an extension
plain clients ignore; message.content keeps the text)."""

from __future__ import annotations

import base64
import time
import uuid

import numpy as np

from gptlab.errors import GptlabError
from gptlab.omni.media import load_part, png_bytes, resample, wav_bytes
from gptlab.serve.protocol import APIError

AUDIO_FORMATS = ("wav", "pcm16")
PCM16_RATE = 24000  # OpenAI's pcm16: 16-bit little-endian mono at 24 kHz


def model_modalities(tok) -> set[str]:
    return {"text"} | {m for m in ("image", "audio") if hasattr(tok, "codecs") and tok.has(m)}


def content_parts(content: list, i: int, tok) -> list[dict]:
    """A message's OpenAI content parts -> the chat template's parts; media a text-only model cannot read,
    remote URLs and undecodable data are 400s."""
    have = model_modalities(tok)
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        wants = {"image_url": "image", "input_audio": "audio", "image": "image", "audio": "audio"}.get(kind)
        if wants and wants not in have:
            raise APIError(400, f"messages[{i}].content[{j}]: this model reads {' and '.join(sorted(have))} only; "
                                f"it cannot take {wants} input", param="messages", code="modality_not_supported")
        if kind in ("image", "audio") and wants:
            raise APIError(400, f"messages[{i}].content[{j}]: send images as image_url parts and audio as "
                                "input_audio parts", param="messages")
        try:
            out.append(load_part(part, f"messages[{i}].content[{j}]"))
        except GptlabError as e:
            raise APIError(400, str(e), param="messages") from None
    return out


def output_modalities(body: dict, tok) -> tuple[tuple[str, ...], str | None]:
    """-> (the media the reply may hold, the audio format or None)."""
    mods = body.get("modalities")
    if mods is None:
        mods = ["text"]
    if not isinstance(mods, list) or not mods or not all(isinstance(m, str) for m in mods):
        raise APIError(400, "'modalities' must be a non-empty list such as [\"text\"] or [\"text\", \"audio\"]",
                       param="modalities")
    unknown = set(mods) - {"text", "audio", "image"}
    if unknown:
        raise APIError(400, f"unknown modalities {sorted(unknown)} (text, audio, image)", param="modalities")
    missing = set(mods) - model_modalities(tok)
    if missing:
        raise APIError(400, f"this model cannot answer with {' or '.join(sorted(missing))}; it answers with "
                            f"{', '.join(sorted(model_modalities(tok)))}", param="modalities",
                       code="modality_not_supported")
    fmt = None
    audio = body.get("audio")
    if "audio" in mods:
        if not isinstance(audio, dict):
            raise APIError(400, "'audio' is required with modalities [\"text\", \"audio\"]: "
                                "{\"voice\": ..., \"format\": \"wav\"}", param="audio")
        fmt = audio.get("format", "wav")
        if fmt not in AUDIO_FORMATS:
            raise APIError(400, f"audio.format must be one of {', '.join(AUDIO_FORMATS)}, got {fmt!r}", param="audio.format")
    elif audio is not None:
        raise APIError(400, "'audio' needs \"audio\" in modalities", param="audio")
    return tuple(m for m in mods if m != "text"), fmt


def audio_bytes(wave: np.ndarray, fmt: str) -> bytes:
    if fmt == "pcm16":
        return (np.clip(resample(wave, 16000, PCM16_RATE), -1, 1) * 32767).astype("<i2").tobytes()
    return wav_bytes(wave)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image_part(image: np.ndarray) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png_bytes(image, scale=8))}}


def audio_message(waves: list[np.ndarray], transcript: str, fmt: str) -> dict:
    wave = np.concatenate(waves) if waves else np.zeros(0, np.float32)
    return {"id": "audio_" + uuid.uuid4().hex[:24], "data": b64(audio_bytes(wave, fmt)),
            "expires_at": int(time.time()) + 3600, "transcript": transcript}
