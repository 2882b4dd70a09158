"""Causal self-attention with per-layer patterns: dense (GPT-2), locally banded (GPT-3's alternate
layers) and the Sparse Transformer's strided and fixed patterns.

Each pattern is one `mask_mod(b, h, q, kv) -> bool` on absolute positions. The same function builds
FlexAttention block masks (sparse kernels that skip empty blocks) and the exact boolean masks of the
SDPA and naive backends, so the backends cannot disagree about which tokens a query sees.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.model.config import GPTConfig

MaskMod = Callable[..., torch.Tensor]


def make_mask_mod(kind: str, window: int, stride: int, c: int, q_offset: int = 0, kv_offset: int = 0) -> MaskMod:
    """Which keys a query may attend to; q/kv are indices shifted to absolute positions by the offsets."""

    def mask_mod(b, h, q_idx, kv_idx):
        q, kv = q_idx + q_offset, kv_idx + kv_offset
        causal = q >= kv
        if kind == "dense":
            return causal
        if kind == "local":  # a band: itself and the window-1 tokens before it
            return causal & (q - kv < window)
        if kind == "strided":  # Sparse Transformer strided: the last `stride` tokens, plus every stride-th one
            return causal & (((q - kv) < stride) | ((q - kv) % stride == 0))
        if kind == "fixed":  # Sparse Transformer fixed: own block, plus the last c "summary" columns of each block
            return causal & ((q // stride == kv // stride) | (kv % stride >= stride - c))
        raise ValueError(kind)

    return mask_mod


def bool_mask(mask_mod: MaskMod, T: int, S: int, device) -> torch.Tensor:
    """(T, S) boolean mask, True where attention is allowed."""
    q = torch.arange(T, device=device)[:, None]
    kv = torch.arange(S, device=device)[None, :]
    return mask_mod(None, None, q, kv)


@functools.lru_cache(maxsize=64)
def _cached_bool_mask(kind, window, stride, c, q_off, kv_off, T, S, device) -> torch.Tensor:
    return bool_mask(make_mask_mod(kind, window, stride, c, q_off, kv_off), T, S, device)


@functools.lru_cache(maxsize=64)
def _cached_block_mask(kind, window, stride, c, q_off, kv_off, T, S, device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(make_mask_mod(kind, window, stride, c, q_off, kv_off), None, None, T, S, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def naive_attention(q, k, v, mask: torch.Tensor, dropout_p: float = 0.0, training: bool = False):
    """Reference: explicit masked softmax. q (B, H, T, D), k/v (B, H, S, D), mask (T, S)."""
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, H, T, S)
    att = att.masked_fill(~mask, float("-inf"))
    att = F.softmax(att.float(), dim=-1).to(q.dtype)
    att = F.dropout(att, p=dropout_p, training=training)
    return att @ v  # (B, H, T, D)


def attend(q, k, v, kind: str, cfg: GPTConfig, q_offset: int = 0, kv_offset: int = 0,
           dropout_p: float = 0.0, training: bool = False, backend: str | None = None) -> torch.Tensor:
    """Dispatch one attention call. q (B, H, T, D); k, v (B, H, S, D); positions are q_offset+i, kv_offset+j."""
    backend = backend or cfg.attn_backend
    T, S, dev = q.size(2), k.size(2), q.device
    key = (kind, cfg.local_window, cfg.sparse_stride, cfg.sparse_c, q_offset, kv_offset, T, S, dev)
    if backend == "auto":
        # FlexAttention needs torch.compile for a fused kernel: worth it for training on CUDA, where shapes
        # are fixed. On CPU, and for inference (a new length per decoded token would recompile), the exact
        # boolean-mask SDPA is used. Dropout inside attention is SDPA-only.
        use_flex = kind != "dense" and dev.type == "cuda" and torch.is_grad_enabled() and not (training and dropout_p > 0)
        backend = "flex" if use_flex else "sdpa"
    if backend == "naive":
        return naive_attention(q, k, v, _cached_bool_mask(*key), dropout_p, training)
    if backend == "flex":
        if training and dropout_p > 0:
            raise ValueError("FlexAttention has no attention dropout; use attn_backend=sdpa or attn_pdrop=0")
        return _compiled_flex()(q, k, v, block_mask=_cached_block_mask(*key))
    p = dropout_p if training else 0.0
    if dev.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        # Measured on AVX-512/AMX CPUs (torch 2.13): the bf16 flash-attention backward is ~3× slower than
        # fp32's, so CPU attention runs in fp32 (exact softmax too); on CUDA bf16 flash is the fast path.
        with torch.autocast("cpu", enabled=False):  # autocast would cast the inputs back to bf16
            return _sdpa(q.float(), k.float(), v.float(), kind, key, p).to(q.dtype)
    return _sdpa(q, k, v, kind, key, p)


def _sdpa(q, k, v, kind: str, key: tuple, p: float) -> torch.Tensor:
    T, S, q_offset, kv_offset = q.size(2), k.size(2), key[4], key[5]
    if kind == "dense" and T == S and q_offset == kv_offset:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_cached_bool_mask(*key), dropout_p=p)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg, self.kind = cfg, cfg.layer_attention(layer)
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        inner = cfg.n_head * cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, 3 * inner, bias=cfg.bias)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(inner, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual_proj = True  # scaled at init for GPT-2/3
        self.resid_drop = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x: torch.Tensor, pos_offset: int = 0, cache=None) -> torch.Tensor:
        """x (B, T, C). With a KV cache (gptlab.generate.cache.LayerCache), keys and values of earlier
        calls are reused and positions come from the cache."""
        B, T, _ = x.shape  # (B, T, C)
        q, k, v = self.c_attn(x).split(self.n_head * self.head_dim, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if cache is not None:
            y = cache.attend(q, k, v)
        else:
            y = attend(q, k, v, self.kind, self.cfg, pos_offset, pos_offset, self.cfg.attn_pdrop, self.training)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)  # (B, T, H·D)
        return self.resid_drop(self.c_proj(y))
