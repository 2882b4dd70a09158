"""The embedded omni corpus, real and offline: scikit-learn's 1,797 handwritten digit scans (8×8) and speech
synthesised with eSpeak NG, turned into chat examples with OpenAI-style content parts, one task per
direction: image→text, text→image, speech→text, text→speech, image+speech→speech and one reply that mixes
image, speech and text. A fifth of the images and one voice are held out for test.jsonl only; the
assistant always speaks in its own voice, and writes what it said after it (the transcript the API
returns). Deterministic for a seed; tokenizers are trained on the train split and saved beside the data
(`tokenizer.gptlab.json` is the omni vocabulary a run starts from)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gptlab.chat.template import CHAT_TOKENS
from gptlab.errors import GptlabError
from gptlab.fileio import atomic_write_json
from gptlab.omni.espeak import speak
from gptlab.omni.media import png_bytes
from gptlab.run.lock import LOCK_FILE
from gptlab.tokenizer import CharTokenizer, MelAudioCodec, OmniTokenizer, PatchImageCodec

WORDS = "zero one two three four five six seven eight nine".split()
TRAIN_VOICES = ("en-us", "en+m1", "en+m2", "en+m4", "en+f1", "en+f2", "en+f4", "en-us+m3")
TEST_VOICE = "en+f3"                         # never heard in training
ASSISTANT_VOICE = ("en+f2", 160, 50)         # the model's own voice (voice, rate, pitch): the one PocketSphinx hears best
TASKS = ("image_to_text", "text_to_image", "speech_to_text", "text_to_speech", "image_speech_to_speech", "mixed")
QUESTION = "What digit is this?"


class _Writer:
    """Writes the media files of one split and remembers the assistant's utterances (one file per text)."""

    def __init__(self, root: Path, split: str, images: np.ndarray, rng: np.random.Generator, voices):
        self.root, self.split, self.images, self.rng, self.voices = root, split, images, rng, voices
        self.n = 0
        self.said: dict[str, str] = {}

    def image(self, index: int) -> dict:
        rel = f"images/{self.split}_{index:04d}.png"
        if not (self.root / rel).exists():
            (self.root / rel).write_bytes(png_bytes(self.images[index]))
        return {"type": "image", "path": rel}

    def _audio(self, rel: str, wave: np.ndarray) -> dict:
        import soundfile as sf

        sf.write(self.root / rel, wave, 16000, format="FLAC")
        return {"type": "audio", "path": rel}

    def user_speech(self, text: str) -> dict:
        self.n += 1
        voice = self.voices[int(self.rng.integers(len(self.voices)))]
        wave = speak(text, voice, int(self.rng.integers(140, 201)), int(self.rng.integers(30, 71)))
        return self._audio(f"audio/{self.split}_user_{self.n:05d}.flac", wave)

    def assistant_speech(self, text: str) -> dict:
        if text not in self.said:
            self.said[text] = f"audio/assistant_{len(self.said):04d}.flac" if self.split == "train" else \
                f"audio/{self.split}_assistant_{len(self.said):04d}.flac"
            self._audio(self.said[text], speak(text, *ASSISTANT_VOICE))
        return {"type": "audio", "path": self.said[text]}


def _digits(rng: np.random.Generator) -> str:
    return " ".join(WORDS[int(d)] for d in rng.integers(0, 10, int(rng.integers(1, 4))))


def _example(task: str, w: _Writer, by_label: dict[int, list[int]], labels: np.ndarray) -> dict:
    rng = w.rng
    label = int(rng.integers(10))
    idx = int(rng.choice(by_label[label]))
    user = lambda *parts: {"role": "user", "content": list(parts)}  # noqa: E731
    reply = lambda *parts: {"role": "assistant", "content": list(parts)}  # noqa: E731
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    if task == "image_to_text":
        msgs, answer = [user(text(QUESTION), w.image(idx)), reply(text(WORDS[label]))], WORDS[label]
    elif task == "text_to_image":
        msgs, answer = [user(text(f"Draw a {WORDS[label]}.")), reply(w.image(idx))], WORDS[label]
    elif task == "speech_to_text":
        s = _digits(rng)
        msgs, answer = [user(w.user_speech(s)), reply(text(s))], s
    elif task == "text_to_speech":  # a spoken reply is followed by its transcript, as GPT-4o's are
        s = _digits(rng)
        msgs, answer = [user(text(f"Say {s}.")), reply(w.assistant_speech(s), text(s))], s
    elif task == "image_speech_to_speech":
        msgs = [user(w.image(idx), w.user_speech("what digit is this")),
                reply(w.assistant_speech(WORDS[label]), text(WORDS[label]))]
        answer = WORDS[label]
    else:
        msgs = [user(text(f"Draw a {WORDS[label]} and say its name.")),
                reply(w.image(idx), w.assistant_speech(WORDS[label]), text(WORDS[label]))]
        answer = WORDS[label]
    return {"task": task, "answer": answer, "messages": msgs}


def split_digits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits as (images in [0, 1], labels, held-out mask): a seeded fifth held out."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = (digits.images / 16.0).astype(np.float32), digits.target
    held = np.zeros(len(images), bool)
    held[np.random.default_rng(seed).permutation(len(images))[: len(images) // 5]] = True
    return images, labels, held


def build_corpus(out: str | Path, *, per_task: int = 1000, test_per_task: int = 50, seed: int = 0,
                 image_codes: int = 16, image_patch: int = 1, audio_codes: int = 1024, quiet: bool = False) -> dict:
    """Write the corpus and its tokenizers into `out` -> summary (counts, voices, tokenizer figures)."""
    root = Path(out)
    if root.exists() and any(p.name != LOCK_FILE for p in root.iterdir()):
        raise GptlabError(f"{root} already exists and is not empty; choose a new --out")
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "audio").mkdir(exist_ok=True)
    images, labels, held = split_digits(seed)
    summary = {"seed": seed, "train_voices": list(TRAIN_VOICES), "test_voice": TEST_VOICE,
               "assistant_voice": ASSISTANT_VOICE[0], "tasks": list(TASKS)}
    for split, n, voices in (("train", per_task, TRAIN_VOICES), ("test", test_per_task, (TEST_VOICE,))):
        keep = ~held if split == "train" else held
        by_label = {d: [int(i) for i in np.flatnonzero(keep & (labels == d))] for d in range(10)}
        w = _Writer(root, split, images, np.random.default_rng([seed, split == "test"]), voices)
        rows = [_example(t, w, by_label, labels) for t in TASKS for _ in range(n)]
        with open(root / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        summary[split] = {"examples": len(rows), "images": int(keep.sum()), "user_utterances": w.n}
        if not quiet:
            print(f"omni-data: {split}: {len(rows):,} examples ({n} per task), {w.n:,} user utterances")
    summary["tokenizers"] = train_tokenizers(root, images[~held], image_codes, image_patch, audio_codes, seed, quiet)
    atomic_write_json(root / "meta.json", summary)
    return summary


def train_tokenizers(root: Path, train_images: np.ndarray, image_codes: int, image_patch: int, audio_codes: int,
                     seed: int, quiet: bool) -> dict:
    """Image codec on the training images, audio codec on the training speech, a char vocabulary over the
    training text; saved as image/audio tokenizer files and joined into the omni tokenizer."""
    from gptlab.omni.media import load_audio

    rows = [json.loads(ln) for ln in (root / "train.jsonl").read_text().splitlines()]
    texts = [p["text"] for r in rows for m in r["messages"] for p in m["content"] if p["type"] == "text"]
    audio_files = sorted({p["path"] for r in rows for m in r["messages"] for p in m["content"] if p["type"] == "audio"})
    image = PatchImageCodec.train(list(train_images), size=8, patch=image_patch, codes=image_codes, seed=seed)
    audio = MelAudioCodec.train([load_audio(root / f) for f in audio_files], codes=audio_codes, seed=seed)
    image.save(root / "image_tokenizer.json")
    audio.save(root / "audio_tokenizer.json")
    text = CharTokenizer.from_texts([*texts, "\n"]).with_special_tokens(CHAT_TOKENS)  # the template's newline
    omni = OmniTokenizer(text, image, audio)
    omni.save(root)
    out = {"text_ids": text.vocab_size, "image_codes": image.n_codes, "image_tokens_per_image": image.tokens_per_item,
           "audio_codes": audio.n_codes, "audio_codes_per_second": audio.codes_per_second, "vocab_size": omni.vocab_size}
    if not quiet:
        print(f"omni-data: tokenizers: {out}")
    return out
