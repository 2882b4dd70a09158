"""Preallocated KV cache, one per layer, for prefill + incremental decoding.

Rows of a batch may be left-padded to a common length: `pad[b]` slots at the front of row b are padding,
so the token in slot i has position i - pad[b] and padding slots are never attended to. Dense, strided
and fixed layers keep every key (their patterns reach arbitrarily far back); a local layer keeps a ring
buffer of its window, since a banded query never looks further back than that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptlab.model.attention import make_mask_mod
from gptlab.model.config import GPTConfig


class LayerCache:
    def __init__(self, parent: "KVCache", kind: str, cfg: GPTConfig, capacity: int, ring: bool):
        B, H, D = parent.batch, cfg.n_head, cfg.head_dim
        kw = dict(device=parent.device)
        self.parent, self.kind, self.cfg, self.capacity, self.ring = parent, kind, cfg, capacity, ring
        self.k = torch.zeros(B, H, capacity, D, dtype=parent.dtype, **kw)
        self.v = torch.zeros_like(self.k)
        if ring:  # slot -> absolute position and validity; full-length layers share the parent's
            self.pos = torch.zeros(B, capacity, dtype=torch.long, **kw)
            self.valid = torch.zeros(B, capacity, dtype=torch.bool, **kw)
        self.mask_mod = make_mask_mod(kind, cfg.local_window, cfg.sparse_stride, cfg.sparse_c)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, H, T, D) of the new tokens -> attention output (B, H, T, D); stores k, v."""
        p, T = self.parent, q.size(2)
        n, q_pos, q_valid = p.length, p.q_pos, p.q_valid
        if not self.ring:
            self.k[:, :, n:n + T], self.v[:, :, n:n + T] = k, v
            K, V, k_pos, k_valid = self.k[:, :, :n + T], self.v[:, :, :n + T], p.pos[:, :n + T], p.valid[:, :n + T]
            own = n  # index of the first new key in K
        else:  # keys = ring (older tokens) + the new ones; then the newest `capacity` go into the ring
            K, V = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
            k_pos, k_valid = torch.cat([self.pos, q_pos], 1), torch.cat([self.valid, q_valid], 1)
            own = self.capacity
            m = min(T, self.capacity)
            slots = (torch.arange(n + T - m, n + T, device=q.device) % self.capacity)
            self.k[:, :, slots], self.v[:, :, slots] = k[:, :, T - m:], v[:, :, T - m:]
            self.pos[:, slots], self.valid[:, slots] = q_pos[:, T - m:], q_valid[:, T - m:]
        if self.kind == "dense" and not p.padded and not self.ring:
            if T == 1:  # the newest token sees everything before it: no mask at all
                return _sdpa(q, K, V, None, False)
            if n == 0:
                return _sdpa(q, K, V, None, True)
        allowed = self.mask_mod(None, None, q_pos[:, :, None], k_pos[:, None, :]) & k_valid[:, None, :]  # (B, T, S)
        # a padding query sees only invalid keys; let it see itself so softmax stays finite (output unused)
        t = torch.arange(T, device=q.device)
        allowed[:, t, own + t] = True
        return _sdpa(q, K, V, allowed[:, None], False)

    def reorder(self, index: torch.Tensor) -> None:
        for name in ("k", "v", "pos", "valid") if self.ring else ("k", "v"):
            setattr(self, name, getattr(self, name).index_select(0, index))


def _sdpa(q, k, v, mask, causal: bool) -> torch.Tensor:
    if q.device.type == "cpu" and q.dtype != torch.float32:  # see attention.attend: CPU bf16 kernels are slower
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


class KVCache:
    """Cache for a batch of `batch` rows and at most `max_len` slots per row (prompt + new tokens)."""

    def __init__(self, cfg: GPTConfig, batch: int, max_len: int, device, dtype: torch.dtype,
                 pad: torch.Tensor | None = None, ring: bool = True):
        self.batch, self.device, self.dtype, self.length = batch, torch.device(device), dtype, 0
        self.cfg = cfg
        self.max_position = cfg.block_size - 1
        self.pad = pad.to(self.device) if pad is not None else torch.zeros(batch, dtype=torch.long, device=self.device)
        self.padded = bool(self.pad.any())
        self.holes = torch.zeros(batch, dtype=torch.long, device=self.device)  # rejected draft slots (rewind)
        self.pos = torch.zeros(batch, max_len, dtype=torch.long, device=self.device)  # slot -> position
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=self.device)  # slot holds a token
        self.layers = []
        for i in range(cfg.n_layer):
            kind = cfg.layer_attention(i)
            use_ring = ring and kind == "local" and cfg.local_window < max_len  # ring=False: row surgery below
            self.layers.append(LayerCache(self, kind, cfg, cfg.local_window if use_ring else max_len, use_ring))
        self.max_len = max_len

    def begin(self, T: int) -> torch.Tensor:
        """Positions (B, T) of the next T slots; call before the forward pass that fills them."""
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} slots; {self.length} used, {T} more requested")
        idx = torch.arange(self.length, self.length + T, device=self.device)[None, :]  # (1, T)
        self.q_valid = idx >= self.pad[:, None]  # (B, T)
        # clamp: a row that already hit its own length limit keeps being fed (its output unused)
        self.q_pos = (idx - self.pad[:, None] - self.holes[:, None]).clamp(0, self.max_position)
        n = self.length
        self.pos[:, n:n + T], self.valid[:, n:n + T] = self.q_pos, self.q_valid
        return self.q_pos

    def end(self, T: int) -> None:
        self.length += T

    def reorder(self, index: torch.Tensor) -> None:
        """Select/reorder rows (beam search)."""
        self.pad, self.holes = self.pad.index_select(0, index), self.holes.index_select(0, index)
        self.pos, self.valid = self.pos.index_select(0, index), self.valid.index_select(0, index)
        for layer in self.layers:
            layer.reorder(index)

    # --- row surgery for continuous batching (caches built with ring=False) ---------------------------
    def _check_flat(self) -> None:
        if any(layer.ring for layer in self.layers):
            raise ValueError("row surgery needs a KVCache built with ring=False")

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only the rows in `index` (in that order), e.g. to drop finished requests."""
        self._check_flat()
        self.reorder(index)
        self.batch = int(index.numel())
        self.trim_front()

    def trim_front(self) -> None:
        """Drop leading slots that are padding in every row (views, no copy): after rows leave, the
        cache is only as long as its longest remaining row."""
        s = int(self.pad.min()) if self.batch else self.length
        if s > 0:
            self.pad = self.pad - s
            self.pos, self.valid = self.pos[:, s:], self.valid[:, s:]
            for layer in self.layers:
                layer.k, layer.v = layer.k[:, :, s:], layer.v[:, :, s:]
                layer.capacity -= s
            self.length -= s
            self.max_len -= s
        self.padded = bool(self.pad.any() or self.holes.any())

    def write_row(self, row: int, start: int, kv: torch.Tensor) -> None:
        """Fill slots start.. of `row` with a sequence's first kv.size(3) tokens: kv (n_layer, 2, H, c, D),
        positions 0..c-1 (a cached prefix copied in before the rest of the prompt is prefilled)."""
        self._check_flat()
        c = kv.size(3)
        for layer, (k, v) in zip(self.layers, kv):
            layer.k[row, :, start:start + c], layer.v[row, :, start:start + c] = k, v
        self.pos[row, start:start + c] = torch.arange(c, device=self.device)
        self.valid[row, start:start + c] = True

    def read_row(self, row: int, a: int, b: int) -> torch.Tensor:
        """KV of `row`'s tokens a..b-1 (counted from its first token) -> (n_layer, 2, H, b - a, D)."""
        self._check_flat()
        slots = self.valid[row, :self.length].nonzero()[a:b, 0]  # skips padding and rewound slots
        return torch.stack([torch.stack([layer.k[row, :, slots], layer.v[row, :, slots]]) for layer in self.layers])

    def rewind(self, start: int, kept: torch.Tensor) -> None:
        """After a forward over slots start..length-1, row b keeps only its first kept[b] of them (speculative
        decoding: the drafts the target rejected). The cache shrinks to the longest row's need; shorter rows'
        dropped slots become holes (invalid, and not counted in later positions)."""
        self._check_flat()
        end = start + int(kept.max())
        kept = kept.to(self.device)
        idx = torch.arange(start, end, device=self.device)
        self.valid[:, start:end] &= idx[None, :] < (start + kept)[:, None]
        self.holes += end - start - kept
        self.length = end
        self.padded = bool(self.pad.any() or self.holes.any())

    @staticmethod
    def concat(caches: list["KVCache"], room: int) -> "KVCache":
        """One cache holding the rows of `caches` (in order), right-aligned to the longest filled length
        L by extra left padding, with L + room slots: new rows join a running batch between decode steps."""
        caches = [c for c in caches if c.batch]
        for c in caches:
            c._check_flat()
        first = caches[0]
        L = max(c.length for c in caches)
        pad = torch.cat([c.pad + (L - c.length) for c in caches])
        out = KVCache(first.cfg, int(pad.numel()), L + room, first.device, first.dtype, pad, ring=False)
        out.holes = torch.cat([c.holes for c in caches])
        out.padded = out.padded or bool(out.holes.any())
        b = 0
        for c in caches:
            rows, d = slice(b, b + c.batch), L - c.length
            out.pos[rows, d:L], out.valid[rows, d:L] = c.pos[:, :c.length], c.valid[:, :c.length]
            for lo, li in zip(out.layers, c.layers):
                lo.k[rows, :, d:L], lo.v[rows, :, d:L] = li.k[:, :, :c.length], li.v[:, :, :c.length]
            b += c.batch
        out.length = L
        return out
