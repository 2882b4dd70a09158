"""Fused linear + cross-entropy: the LM loss without materialising (B·T, V) logits for autograd.

The plain path (logits = h @ Wᵀ, then F.cross_entropy) keeps the full logits, their fp32 copy,
log-probabilities and their gradient alive: four (B·T × V) tensors, 200 MB each for GPT-2 at 1024 tokens,
and most of a CPU training step's non-matmul time. Here each chunk of rows is projected, turned into
(softmax − onehot)/N right away, and folded into grad_h and grad_W during the forward; backward only
scales them. Matmuls run in the autocast dtype (bf16 on AMX/tensor cores), softmax in fp32.
"""

from __future__ import annotations

import torch

_CHUNK_ELEMENTS = 1 << 26  # fp32 logits per chunk (256 MB)
SELECT_ROWS_ON = ("cpu",)  # device types where only the rows with a target are computed


def _compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int, chunk_rows: int):
        # h (N, C), weight (V, C), targets (N,) -> mean loss over targets != ignore_index
        dev = h.device.type
        dt = _compute_dtype(dev, h.dtype)
        with torch.autocast(dev, enabled=False):
            valid = targets != ignore_index
            n_valid = valid.sum().clamp_min(1).to(torch.float32)
            # on CPU only the predicted rows go through the head: pads and masked prompts (often half of a
            # fine-tuning batch) cost nothing, nor does a batch without LM targets. On GPUs finding the rows
            # would sync with the host every step, so there every row runs, masked.
            rows = valid.nonzero().squeeze(1) if dev in SELECT_ROWS_ON and not bool(valid.all()) else None
            hv, tv, vv = (h, targets, valid) if rows is None else (h[rows], targets[rows], valid[rows])
            hc, wc = hv.to(dt), weight.to(dt)
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_hv = torch.empty_like(hv) if need_h else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, hv.size(0), chunk_rows):
                e = min(s + chunk_rows, hv.size(0))
                logp = torch.log_softmax((hc[s:e] @ wc.t()).float(), dim=-1)  # (n, V), one fused kernel
                t, v = tv[s:e].clamp_min(0), vv[s:e]
                loss -= (logp.gather(1, t[:, None]).squeeze(1) * v).sum()
                if need_h or need_w:
                    g = logp.exp_()  # softmax, in place: d loss / d logits = (p - onehot) / N
                    g[torch.arange(e - s, device=g.device), t] -= 1.0
                    g *= (v.float() / n_valid)[:, None]
                    g = g.to(dt)
                    if need_h:
                        grad_hv[s:e] = g @ wc
                    if need_w:
                        grad_w += g.t() @ hc[s:e]
            grad_h = grad_hv if rows is None or grad_hv is None else \
                torch.zeros_like(h).index_copy_(0, rows, grad_hv)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of softmax(h @ weightᵀ) against targets. h (..., C), targets (...)."""
    h2, t2 = h.reshape(-1, h.size(-1)), targets.reshape(-1)
    rows = chunk_rows or max(64, _CHUNK_ELEMENTS // weight.size(0))
    return LinearCrossEntropy.apply(h2, weight, t2, ignore_index, rows)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(..., V) logits, (...) targets -> (...) log p(target), in fp32 (bf16 log-softmax loses the small
    differences the PPO ratio, the KL and likelihood comparisons are made of). The one log-prob function:
    DPO's and PPO's response log-probs and evaluation's scores all go through it."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
