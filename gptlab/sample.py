"""A simple sampler (full recompute, no KV cache): enough to read what a model learned."""

from __future__ import annotations

import torch

from gptlab.model import GPT


@torch.no_grad()
def sample(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None, stop_id: int | None = None) -> torch.Tensor:
    """idx (B, T) -> (B, T + new). Crops the context to the model's block size."""
    was_training = model.training
    model.eval()
    try:
        return _sample(model, idx, max_new_tokens, temperature, top_k, generator, stop_id)
    finally:
        model.train(was_training)


def _sample(model, idx, max_new_tokens, temperature, top_k, generator, stop_id):
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.cfg.block_size:])
        logits = logits[:, -1, :].float()  # (B, V)
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
        if stop_id is not None and (nxt == stop_id).all():
            break
    return idx
