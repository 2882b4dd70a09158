"""Images and audio in and out: files (PNG/JPEG through Pillow, WAV/FLAC through soundfile, resampled to
16 kHz mono), bytes, base64 and data: URLs, and back to PNG/WAV bytes. One-line errors for anything else."""

from __future__ import annotations

import base64
import binascii
import io
import math
from pathlib import Path

import numpy as np

from gptlab.errors import GptlabError
from gptlab.tokenizer.audio import SAMPLE_RATE


def _bytes_of(src, what: str) -> bytes:
    if isinstance(src, (bytes, bytearray)):
        return bytes(src)
    p = Path(src)
    if not p.is_file():
        raise GptlabError(f"{what} file not found: {p}")
    return p.read_bytes()


def load_image(src) -> np.ndarray:
    """A path or bytes -> uint8 array (H×W grey, or H×W×3 colour)."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(_bytes_of(src, "image")))
        im.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise GptlabError(f"not a readable image ({src if not isinstance(src, bytes) else 'bytes'}): {e}") from None
    return np.asarray(im.convert("L" if im.mode in ("L", "LA", "I", "I;16", "1") else "RGB"))  # palettes: colour


def load_audio(src) -> np.ndarray:
    """A path or bytes (WAV, FLAC, OGG: whatever libsndfile reads) -> 16 kHz mono float32."""
    import soundfile as sf

    try:
        wave, sr = sf.read(io.BytesIO(_bytes_of(src, "audio")), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise GptlabError(f"not readable audio ({src if not isinstance(src, bytes) else 'bytes'}): {e}") from None
    return resample(wave.mean(1), sr)


def resample(wave: np.ndarray, sr: int, to: int = SAMPLE_RATE) -> np.ndarray:
    if sr == to:
        return np.asarray(wave, np.float32)
    from scipy.signal import resample_poly

    g = math.gcd(int(sr), to)
    return resample_poly(np.asarray(wave, np.float32), to // g, int(sr) // g).astype(np.float32)


def png_bytes(image: np.ndarray, scale: int = 1) -> bytes:
    """A float [0, 1] or uint8 image -> PNG bytes (nearest-neighbour upscaled by `scale` for viewing)."""
    from PIL import Image

    x = np.asarray(image)
    x = x if x.dtype == np.uint8 else (np.clip(x, 0, 1) * 255).round().astype(np.uint8)
    im = Image.fromarray(x)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(wave: np.ndarray, sr: int = SAMPLE_RATE) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(wave, np.float32), -1, 1), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def decode_base64(data: str, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise GptlabError(f"{what} is not valid base64") from None


def data_url_bytes(url: str, what: str = "image_url") -> bytes:
    """`data:image/png;base64,...` -> bytes. Other URLs are refused: nothing is fetched from the network."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise GptlabError(f"{what}: only data: URLs are accepted (this server fetches nothing from the network); "
                          "send the file inline as data:image/png;base64,...")
    head, _, payload = url.partition(",")
    if not head.endswith(";base64"):
        raise GptlabError(f"{what}: a data: URL must be base64-encoded (data:<type>;base64,<data>)")
    return decode_base64(payload, what)


def load_part(part, where: str, base: Path | None = None) -> dict:
    """A content part as files and APIs write it -> the chat template's part. Accepted: {"type": "text"},
    {"type": "image"|"audio", "path": P} (P relative to `base`), OpenAI's {"type": "image_url",
    "image_url": {"url": "data:..."}} and {"type": "input_audio", "input_audio": {"data": b64, "format"}};
    parts already holding an array pass through."""
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise GptlabError(f"{where}: a content part must be an object with a 'type'")
    kind = part["type"]
    if kind == "text" or (kind in ("image", "audio") and kind in part):
        return part
    if kind in ("image", "audio") and isinstance(part.get("bytes"), bytes):  # a Hugging Face dataset's media
        try:
            return {"type": kind, kind: (load_image if kind == "image" else load_audio)(part["bytes"])}
        except GptlabError as e:
            raise GptlabError(f"{where}: {e}") from None
    if kind in ("image", "audio") and "path" in part:
        p = Path(part["path"])
        p = p if p.is_absolute() or base is None else base / p
        try:
            return {"type": kind, kind: (load_image if kind == "image" else load_audio)(p)}
        except GptlabError as e:
            raise GptlabError(f"{where}: {e}") from None
    try:
        if kind == "image_url":
            url = part.get("image_url", {}).get("url") if isinstance(part.get("image_url"), dict) else part.get("image_url")
            return {"type": "image", "image": load_image(data_url_bytes(url))}
        if kind == "input_audio":
            spec = part.get("input_audio")
            if not isinstance(spec, dict) or "data" not in spec:
                raise GptlabError("input_audio must be {'data': base64, 'format': 'wav'}")
            return {"type": "audio", "audio": load_audio(decode_base64(spec["data"], "input_audio.data"))}
    except GptlabError as e:
        raise GptlabError(f"{where}: {e}") from None
    raise GptlabError(f"{where}: unknown content part type {kind!r} (text, image, audio, image_url, input_audio)")


def load_content(content, where: str, base: Path | None = None):
    """A message's content: a string stays; a list of parts is loaded part by part."""
    if isinstance(content, list):
        return [load_part(p, f"{where} part {i}", base) for i, p in enumerate(content)]
    return content


IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
AUDIO_EXTS = {".wav", ".flac", ".ogg"}


def media_files(src: str | Path, exts: set[str]) -> list[Path]:
    """A folder (searched recursively) or a manifest (one path per line, relative to the manifest) -> files."""
    p = Path(src)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in exts)
    elif p.is_file():
        files = [Path(ln.strip()) if Path(ln.strip()).is_absolute() else p.parent / ln.strip()
                 for ln in p.read_text().splitlines() if ln.strip()]
    else:
        raise GptlabError(f"not found: {p} (a folder of files or a manifest listing them)")
    if not files:
        raise GptlabError(f"{p}: no {'/'.join(sorted(exts))} files")
    return files


def save_reply_media(parts: list[dict], out_dir: str | Path, stem: str) -> list[Path]:
    """Write a reply's image and audio parts as OUT/STEM_N.png / .wav -> the paths, in order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, p in enumerate(x for x in parts if x["type"] in ("image", "audio")):
        if p["type"] == "image":
            path = out / f"{stem}_{k}.png"
            path.write_bytes(png_bytes(p["image"], scale=8))
        else:
            path = out / f"{stem}_{k}.wav"
            path.write_bytes(wav_bytes(p["audio"]))
        paths.append(path)
    return paths
