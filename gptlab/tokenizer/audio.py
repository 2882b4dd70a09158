"""The speech tokenizer: 16 kHz audio -> log-mel frames (50 per second) -> the id of each frame's nearest
code in a learned codebook (k-means over frames of the training speech); decoding looks the codes up and
inverts the mel spectrogram with Griffin-Lim. No neural vocoder: the only learned part is the codebook, so
it trains in seconds on a CPU; a learned decoder or a neural codec drops in as another `Codec` kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gptlab.errors import GptlabError
from gptlab.tokenizer.kmeans import kmeans, nearest
from gptlab.tokenizer.base import Codec

SAMPLE_RATE = 16000


def mel_filterbank(sr: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """(n_mels, n_fft//2 + 1) triangular filters, evenly spaced on the HTK mel scale from 0 to sr/2."""
    def mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def hz(m):
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    edges = hz(np.linspace(mel(0.0), mel(sr / 2), n_mels + 2))
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    fb = np.maximum(0.0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
    return torch.tensor(fb, dtype=torch.float32)


class MelAudioCodec(Codec):
    kind = "audio-mel-vq"
    modality = "audio"

    def __init__(self, codebook: np.ndarray, *, n_fft: int = 1024, hop: int = 320, n_mels: int = 80,
                 griffin_lim_iters: int = 32):
        self.codebook = torch.as_tensor(np.asarray(codebook, np.float32))  # (K, n_mels) log-mel frames
        self.n_fft, self.hop, self.n_mels, self.gl_iters = n_fft, hop, n_mels, griffin_lim_iters
        if self.codebook.shape[1] != n_mels:
            raise GptlabError(f"codebook rows have {self.codebook.shape[1]} values, not n_mels={n_mels}")
        self._fb = mel_filterbank(SAMPLE_RATE, n_fft, n_mels)
        self._fb_pinv = torch.linalg.pinv(self._fb)
        self._window = torch.hann_window(n_fft)

    @classmethod
    def train(cls, waves: Sequence[np.ndarray], *, codes: int = 512, seed: int = 0, **kw) -> "MelAudioCodec":
        """Learn the codebook from 16 kHz mono float waveforms."""
        if not waves:
            raise GptlabError("no audio to train the audio tokenizer on")
        probe = cls(np.zeros((1, kw.get("n_mels", 80))), **kw)
        frames = torch.cat([probe.log_mel(w) for w in waves])
        return cls(kmeans(frames, codes, seed=seed).numpy(), **kw)

    @property
    def n_codes(self) -> int:
        return len(self.codebook)

    @property
    def codes_per_second(self) -> float:
        return SAMPLE_RATE / self.hop

    def log_mel(self, wave: np.ndarray) -> torch.Tensor:
        """(samples,) -> (frames, n_mels) log-mel spectrogram."""
        x = torch.as_tensor(np.asarray(wave, np.float32).reshape(-1))
        if len(x) < self.n_fft // 2 + 1:
            x = torch.nn.functional.pad(x, (0, self.n_fft // 2 + 1 - len(x)))
        mag = torch.stft(x, self.n_fft, self.hop, window=self._window, return_complex=True).abs()
        return torch.log(self._fb @ mag + 1e-5).T

    def encode(self, wave: np.ndarray) -> list[int]:
        return nearest(self.log_mel(wave), self.codebook).tolist()

    def decode(self, codes: Sequence[int], seed: int = 0) -> np.ndarray:
        """Code ids -> 16 kHz float waveform (Griffin-Lim from the codes' mel frames; seeded phases)."""
        codes = list(codes)
        if not all(0 <= c < self.n_codes for c in codes):
            raise GptlabError(f"audio codes must be in 0..{self.n_codes - 1}")
        if not codes:
            return np.zeros(0, np.float32)
        n = len(codes)
        codes = codes + codes[-1:] * max(0, 4 - n)  # the inverse STFT needs a few frames: pad, then cut
        mag = (self._fb_pinv @ torch.exp(self.codebook[codes]).T).clamp(min=0)  # (freq, frames)
        g = torch.Generator().manual_seed(seed)
        phase = torch.exp(2j * torch.pi * torch.rand(mag.shape, generator=g))
        stft = dict(n_fft=self.n_fft, hop_length=self.hop, window=self._window)
        for _ in range(self.gl_iters):
            x = torch.istft(mag * phase, **stft)
            phase = torch.exp(1j * torch.angle(torch.stft(x, return_complex=True, **stft)))
        # the codebook holds real log-mel magnitudes, so the level comes out as it went in: no normalising
        # (chunks decoded apart while streaming keep one loudness)
        wave = torch.istft(mag * phase, **stft).clamp(-1, 1).numpy().astype(np.float32)
        return wave[: max(n - 1, 1) * self.hop] if n < 4 else wave

    def _fields(self) -> dict[str, Any]:
        return {"sample_rate": SAMPLE_RATE, "n_fft": self.n_fft, "hop": self.hop, "n_mels": self.n_mels,
                "griffin_lim_iters": self.gl_iters, "codebook": np.round(self.codebook.numpy(), 5).tolist()}

    @classmethod
    def _from_fields(cls, d: dict[str, Any]) -> "MelAudioCodec":
        if d.get("sample_rate", SAMPLE_RATE) != SAMPLE_RATE:
            raise GptlabError(f"audio tokenizers here work at {SAMPLE_RATE} Hz, this one at {d['sample_rate']}")
        return cls(np.asarray(d["codebook"], np.float32), n_fft=int(d["n_fft"]), hop=int(d["hop"]),
                   n_mels=int(d["n_mels"]), griffin_lim_iters=int(d["griffin_lim_iters"]))
