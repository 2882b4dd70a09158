"""The GPT model: one class for the whole lineage.

GPT-1: post-LN blocks (LayerNorm after each residual add, as in the original Transformer), no final LN.
GPT-2: pre-LN blocks + final LayerNorm, residual projections scaled by 1/sqrt(2·n_layer) at init.
GPT-3: GPT-2's block with alternating dense and locally banded sparse attention layers.

The trunk returns hidden states (B, T, C); the LM head is one head over them (tied to the token
embedding). Later stages attach other heads (classification, scalar reward/value) to the same trunk.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.model.attention import CausalSelfAttention
from gptlab.model.config import GPTConfig
from gptlab.model.loss import linear_cross_entropy


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.d_ff, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.d_ff, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual_proj = True
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"
        self.drop = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x):
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.post_ln = cfg.norm == "post"
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.ln_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.ln_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, pos_offset: int = 0, cache=None):  # (B, T, C) -> (B, T, C)
        if self.post_ln:  # GPT-1: h = LN(x + Attn(x)); out = LN(h + MLP(h))
            x = self.ln_1(x + self.attn(x, pos_offset, cache))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), pos_offset, cache)  # GPT-2/3: x + Attn(LN(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.ln_eps, bias=cfg.bias) if cfg.norm == "pre" else nn.Identity()
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.tie_weights()
        if cfg.head:  # task head (GPT-1 fine-tuning): W_y over the final hidden state at the extract token
            self.head = self._make_head(cfg)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        cfg = self.cfg
        if isinstance(m, nn.Linear):
            std = cfg.init_std
            if cfg.scaled_residual_init and getattr(m, "residual_proj", False):
                std /= math.sqrt(2 * cfg.n_layer)  # N = 2·n_layer residual branches add into the stream
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, cfg.init_std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def num_params(self, include_position: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        return n if include_position else n - self.wpe.weight.numel()

    @torch.no_grad()
    def resize_token_embeddings(self, new_vocab: int) -> None:
        """Grow ``wte`` (and an untied ``lm_head``) to ``new_vocab`` rows, e.g. for added special tokens.
        Old rows are kept, new rows drawn from N(0, init_std), the tie, device and dtype are kept and
        ``cfg.vocab_size`` is updated. Call before building the optimizer (the parameters are replaced)."""
        from gptlab.errors import GptlabError

        old = self.cfg.vocab_size
        if isinstance(new_vocab, bool) or not isinstance(new_vocab, int) or new_vocab < old:
            raise GptlabError(f"cannot resize token embeddings from {old} to {new_vocab!r} rows (only growing)")
        if new_vocab == old:
            return

        def grow(w: torch.Tensor) -> nn.Parameter:
            extra = torch.empty(new_vocab - old, w.size(1), device=w.device, dtype=w.dtype)
            nn.init.normal_(extra, 0.0, self.cfg.init_std)
            return nn.Parameter(torch.cat([w, extra]), requires_grad=w.requires_grad)

        self.wte.weight = grow(self.wte.weight)
        self.wte.num_embeddings = new_vocab
        if not self.cfg.tie_embeddings:
            self.lm_head.weight = grow(self.lm_head.weight)
        self.tie_weights()
        self.lm_head.out_features = new_vocab
        self.cfg.vocab_size = new_vocab

    def tie_weights(self) -> None:
        """GPT-2's weight tying: the LM head is the token embedding (one tensor, saved once). Again after
        anything that gives them separate tensors (to_empty, replacing wte)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    @staticmethod
    def _make_head(cfg: GPTConfig) -> nn.Sequential:
        return nn.Sequential(nn.Dropout(cfg.head_pdrop), nn.Linear(cfg.n_embd, cfg.head_out))

    @torch.no_grad()
    def add_head(self, head: str, head_out: int = 0, head_pdrop: float = 0.1) -> None:
        """Attach (or replace) the task head of a built model, e.g. a pretrained one being fine-tuned:
        Dropout(head_pdrop) then Linear(n_embd, head_out), weights N(0, init_std), zero bias, on the
        device and dtype of the embeddings; ``cfg`` is updated so the saved config rebuilds it. Call before
        building the optimizer."""
        import dataclasses

        new_cfg = dataclasses.replace(self.cfg, head=head, head_out=head_out, head_pdrop=head_pdrop)  # validates
        if not new_cfg.head:
            raise ValueError("add_head needs a head kind: 'classifier' or 'scalar'")
        module = self._make_head(new_cfg).to(device=self.wte.weight.device, dtype=self.wte.weight.dtype)
        nn.init.normal_(module[1].weight, 0.0, self.cfg.init_std)
        nn.init.zeros_(module[1].bias)
        self.head = module
        self.cfg.head, self.cfg.head_out, self.cfg.head_pdrop = new_cfg.head, new_cfg.head_out, new_cfg.head_pdrop

    def head_logits(self, h_at: torch.Tensor) -> torch.Tensor:
        """Task head over hidden states (..., C) (GPT-1: the final state at the extract token) -> (..., head_out)."""
        if not self.cfg.head:
            from gptlab.errors import GptlabError

            raise GptlabError("this model has no task head (it was not fine-tuned for a task)")
        return self.head(h_at)

    def hidden(self, idx: torch.Tensor, pos_offset: int = 0, cache=None) -> torch.Tensor:
        """Trunk: token ids (B, T) -> final hidden states (B, T, C). Positions start at pos_offset, or come
        from a KV cache (gptlab.generate.cache.KVCache: per-row positions of left-padded batches)."""
        B, T = idx.shape
        if cache is not None:  # the cache knows each row's positions (and bounds the total length)
            pos = cache.begin(T)
        else:
            if pos_offset + T > self.cfg.block_size:
                raise ValueError(f"sequence of {pos_offset + T} tokens exceeds the context of {self.cfg.block_size}")
            pos = torch.arange(pos_offset, pos_offset + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.h):
            x = block(x, pos_offset, cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.end(T)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, pos_offset: int = 0,
                ignore_index: int = -100):
        """Without targets: (logits (B, T, V), None). With targets: (None, mean cross-entropy over targets
        != ignore_index), computed by the fused linear + cross-entropy that never materialises the logits."""
        h = self.hidden(idx, pos_offset)
        if targets is None:
            return self.lm_head(h), None
        return None, linear_cross_entropy(h, self.lm_head.weight, targets, ignore_index)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6·N (weights, fwd+bwd) + 12·L·H·D·T (attention scores), as in PaLM's MFU."""
        cfg, T = self.cfg, seq_len or self.cfg.block_size
        n = self.num_params(include_position=False)
        # keys seen per query, per layer: all T for dense layers, the band for local ones (others ~ dense)
        seen = sum(min(T, cfg.local_window) if cfg.layer_attention(i) == "local" else T for i in range(cfg.n_layer))
        return 6 * n + 12 * cfg.n_head * cfg.head_dim * seen
