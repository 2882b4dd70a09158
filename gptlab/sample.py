"""A simple sampler (full recompute, no KV cache): enough to read what a model learned during training.
Its token choice is the generator's (gptlab.generate.logits): greedy at temperature 0, else temperature and
top-k, one draw per row from `generator`."""

from __future__ import annotations

import torch

from gptlab.generate.logits import next_tokens
from gptlab.generate.params import SamplingParams
from gptlab.model import GPT


@torch.no_grad()
def sample(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None, stop_id: int | None = None) -> torch.Tensor:
    """idx (B, T) -> (B, T + new). Crops the context to the model's block size."""
    was_training = model.training
    model.eval()
    p = SamplingParams(max_new_tokens=max(1, max_new_tokens), temperature=max(temperature, 0.0), top_k=top_k)
    gens = [generator] * idx.size(0)
    try:
        for _ in range(max_new_tokens):
            logits, _ = model(idx[:, -model.cfg.block_size:])
            nxt = next_tokens(logits[:, -1, :].float(), p, gens)[:, None]  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)
            if stop_id is not None and (nxt == stop_id).all():
                break
        return idx
    finally:
        model.train(was_training)
