"""The image tokenizer: a learned patch codebook (a VQ over non-overlapping p×p patches, trained by k-means,
as Image GPT clusters colours). An image is resized to size×size, cut into (size/p)² patches, and each patch
becomes the id of its nearest code; decoding pastes the codes' patches back. A fixed number of tokens per
image, so the generator knows an image span's length.

With 1×1 patches it is Image GPT's palette: a token per pixel, the codes its grey levels or colours. The
omni corpus uses that (8×8 digits, 16 codes, 64 tokens per image): a small model reads the digit from its
pixels far better than from 2×2-patch codes (97% against 85% on held-out digits in the same short run).
A larger learned VQ (a VQ-VAE or VQGAN for photos on a GPU) drops in as another `Codec` kind with the same
members: n_codes, tokens_per_item, encode, decode (docs/omni.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gptlab.errors import GptlabError
from gptlab.tokenizer.kmeans import kmeans, nearest
from gptlab.tokenizer.base import Codec


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two images with values in [0, 1]."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


class PatchImageCodec(Codec):
    kind = "image-patch-vq"
    modality = "image"

    def __init__(self, codebook: np.ndarray, size: int, patch: int, channels: int):
        if size % patch:
            raise GptlabError(f"image size {size} is not a multiple of the patch size {patch}")
        self.codebook = torch.as_tensor(np.asarray(codebook, np.float32))  # (K, p·p·C) in [0, 1]
        self.size, self.patch, self.channels = size, patch, channels
        if self.codebook.shape[1] != patch * patch * channels:
            raise GptlabError(f"codebook rows have {self.codebook.shape[1]} values, not {patch}²×{channels}")

    @classmethod
    def train(cls, images: Sequence[np.ndarray], *, size: int = 8, patch: int = 2, codes: int = 256,
              channels: int = 1, seed: int = 0) -> "PatchImageCodec":
        """Learn the codebook from images (H×W or H×W×C arrays, values in [0, 1])."""
        if not images:
            raise GptlabError("no images to train the image tokenizer on")
        probe = cls(np.zeros((1, patch * patch * channels)), size, patch, channels)
        patches = torch.cat([probe._patches(im) for im in images])
        return cls(kmeans(patches, codes, seed=seed).numpy(), size, patch, channels)

    @property
    def n_codes(self) -> int:
        return len(self.codebook)

    @property
    def tokens_per_item(self) -> int:
        return (self.size // self.patch) ** 2

    def _patches(self, image: np.ndarray) -> torch.Tensor:
        """An image -> (n patches, p·p·C) in [0, 1], row-major patch order."""
        x = prepare_image(image, self.size, self.channels)
        n, p, C = self.size // self.patch, self.patch, self.channels
        return torch.from_numpy(x.reshape(n, p, n, p, C).transpose(0, 2, 1, 3, 4).reshape(n * n, p * p * C))

    def encode(self, image: np.ndarray) -> list[int]:
        return nearest(self._patches(image), self.codebook).tolist()

    def decode(self, codes: Sequence[int]) -> np.ndarray:
        """Code ids -> (size, size) or (size, size, C) float array in [0, 1]."""
        n, p, C = self.size // self.patch, self.patch, self.channels
        codes = list(codes)
        if len(codes) != n * n or not all(0 <= c < self.n_codes for c in codes):
            raise GptlabError(f"an image is {n * n} codes in 0..{self.n_codes - 1}, got {len(codes)}")
        x = self.codebook[codes].numpy().reshape(n, n, p, p, C).transpose(0, 2, 1, 3, 4).reshape(n * p, n * p, C)
        return x[..., 0] if C == 1 else x

    def _fields(self) -> dict[str, Any]:
        return {"size": self.size, "patch": self.patch, "channels": self.channels,
                "codebook": np.round(self.codebook.numpy(), 6).tolist()}

    @classmethod
    def _from_fields(cls, d: dict[str, Any]) -> "PatchImageCodec":
        return cls(np.asarray(d["codebook"], np.float32), int(d["size"]), int(d["patch"]), int(d["channels"]))


def prepare_image(image: np.ndarray, size: int, channels: int) -> np.ndarray:
    """Any H×W(×C) array (uint8 0..255 or float 0..1) -> (size, size, channels) float32 in [0, 1]."""
    x = np.asarray(image)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    x = np.clip(x.astype(np.float32), 0.0, 1.0)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3:
        raise GptlabError(f"an image is an H×W or H×W×C array, got shape {tuple(x.shape)}")
    if x.shape[2] != channels:  # grey <-> colour
        x = x.mean(2, keepdims=True) if channels == 1 else np.repeat(x[..., :1], channels, 2)
    if x.shape[:2] != (size, size):
        from PIL import Image

        planes = [np.asarray(Image.fromarray(x[..., c]).resize((size, size), Image.BILINEAR)) for c in range(channels)]
        x = np.stack(planes, 2).astype(np.float32)
    return x
