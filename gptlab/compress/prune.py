"""Magnitude pruning: unstructured (per layer or global), N:M semi-structured, and structured (whole
attention heads and FFN channels removed, giving a smaller GPTConfig).

Unstructured and N:M masks zero weights in place; the checkpoint stays dense (zeros stored), so those
models are NOT faster or smaller on CPU — they show how much accuracy a sparsity pattern costs (2:4 is the
pattern sparse tensor cores accelerate on GPUs). Structured pruning changes the shapes: fewer parameters,
smaller files and proportionally faster matmuls everywhere.
Embeddings and the tied LM head are never pruned; only the four Linear layers of each block.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from gptlab.compress.hessian import iter_block_linears
from gptlab.errors import GptlabError


def smallest_mask(scores: torch.Tensor, k: int, dim: int | None = None) -> torch.Tensor:
    """Bool mask marking exactly k smallest scores (over all elements, or k per slice along `dim`).
    Ties are broken by position, so the count is exact."""
    if dim is None:
        flat = scores.reshape(-1)
        mask = torch.zeros_like(flat, dtype=torch.bool)
        if k > 0:
            mask[torch.topk(flat, k, largest=False, sorted=False).indices] = True
        return mask.view_as(scores)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(dim, torch.topk(scores, k, dim=dim, largest=False, sorted=False).indices, True)
    return mask


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise GptlabError(f"sparsity must be in [0, 1), got {sparsity}")


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float, scope: str = "layer") -> dict:
    """Zero the smallest-|w| fraction of each block Linear ('layer') or of all of them together ('global')."""
    _check_sparsity(sparsity)
    linears = list(iter_block_linears(model))
    if scope == "layer":
        for _, lin in linears:
            w = lin.weight
            w.masked_fill_(smallest_mask(w.abs(), round(w.numel() * sparsity)), 0)
    elif scope == "global":
        # exact global count without sorting all weights: find the k-th |w| then break ties by position
        flat = torch.cat([lin.weight.detach().abs().reshape(-1).float() for _, lin in linears])
        k = round(flat.numel() * sparsity)
        if k:
            thr = torch.kthvalue(flat, k).values
            below, at = flat < thr, flat == thr
            extra = k - int(below.sum())
            keep_at = torch.nonzero(at).flatten()[:extra]
            below[keep_at] = True
            off = 0
            for _, lin in linears:
                n = lin.weight.numel()
                lin.weight.masked_fill_(below[off:off + n].view_as(lin.weight), 0)
                off += n
    else:
        raise GptlabError(f"scope must be 'layer' or 'global', got {scope!r}")
    return {"method": "magnitude", "scope": scope, "sparsity": sparsity}


@torch.no_grad()
def nm_prune(model: nn.Module, n: int, m: int) -> dict:
    """Keep the n largest |w| of every m consecutive input weights of each row (2:4 → 50% sparse)."""
    if not 0 < n < m:
        raise GptlabError(f"N:M pruning needs 0 < n < m (e.g. --n 2 --m 4), got {n}:{m}")
    for name, lin in iter_block_linears(model):
        out, cols = lin.weight.shape
        if cols % m:
            raise GptlabError(f"{name}: {cols} input columns are not divisible by m = {m}")
        w = lin.weight.view(out, cols // m, m)
        w.masked_fill_(smallest_mask(w.abs(), m - n, dim=2), 0)
    return {"method": "nm", "n": n, "m": m, "sparsity": 1 - n / m}


def _keep_largest(scores: torch.Tensor, keep: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores, keep).indices).values  # original order


@torch.no_grad()
def structured_prune(model: nn.Module, heads: int = 0, ffn: float = 0.0):
    """Remove `heads` attention heads and a fraction `ffn` of FFN channels from every block (uniform per
    layer, so the result is a plain GPT with n_head - heads heads and a smaller d_ff). Importance by
    magnitude: a head's ‖W_qkv rows‖² + ‖W_proj columns‖², a channel's ‖w_fc row‖ · ‖w_proj column‖.
    Returns (new model, record)."""
    from gptlab.model import GPT

    cfg = model.cfg
    H, D, F_ = cfg.n_head, cfg.head_dim, cfg.d_ff
    if isinstance(heads, bool) or not isinstance(heads, int) or not 0 <= heads < H:
        raise GptlabError(f"--heads must remove 0 to {H - 1} of the {H} heads per layer, got {heads!r}")
    if not 0.0 <= ffn < 1.0:
        raise GptlabError(f"--ffn must be a fraction in [0, 1), got {ffn!r}")
    if heads == 0 and ffn == 0:
        raise GptlabError("structured pruning needs --heads N and/or --ffn FRACTION")
    f_keep = F_ - round(F_ * ffn)
    new_cfg = dataclasses.replace(cfg, n_head=H - heads, head_dim=D, d_ff=f_keep)
    new = GPT(new_cfg).to(device=model.wte.weight.device, dtype=model.wte.weight.dtype)
    sd = {k: v for k, v in model.state_dict().items()}
    for li, block in enumerate(model.h):
        p = f"h.{li}."
        W_qkv, W_o = block.attn.c_attn.weight, block.attn.c_proj.weight  # (3·H·D, C), (C, H·D)
        score = sum(W_qkv[j * H * D:(j + 1) * H * D].view(H, D, -1).float().pow(2).sum((1, 2)) for j in range(3))
        score = score + W_o.view(W_o.size(0), H, D).float().pow(2).sum((0, 2))
        kh = _keep_largest(score, H - heads)
        cols = (kh[:, None] * D + torch.arange(D)[None, :]).flatten()  # kept columns of H·D
        rows = torch.cat([cols + j * H * D for j in range(3)])  # kept rows of q, k, v
        sd[p + "attn.c_attn.weight"] = W_qkv[rows]
        if block.attn.c_attn.bias is not None:
            sd[p + "attn.c_attn.bias"] = block.attn.c_attn.bias[rows]
        sd[p + "attn.c_proj.weight"] = W_o[:, cols]
        W_fc, W_p = block.mlp.c_fc.weight, block.mlp.c_proj.weight  # (F, C), (C, F)
        kf = _keep_largest(W_fc.float().norm(dim=1) * W_p.float().norm(dim=0), f_keep)
        sd[p + "mlp.c_fc.weight"] = W_fc[kf]
        if block.mlp.c_fc.bias is not None:
            sd[p + "mlp.c_fc.bias"] = block.mlp.c_fc.bias[kf]
        sd[p + "mlp.c_proj.weight"] = W_p[:, kf]
    new.load_state_dict({k: v.contiguous() for k, v in sd.items()})
    new.tie_weights()
    record = {"method": "structured", "heads_removed": heads, "ffn_removed": ffn, "n_head": new_cfg.n_head,
              "d_ff": new_cfg.d_ff, "params_before": model.num_params(), "params_after": new.num_params()}
    return new.eval(), record


def sparsity_of(model: nn.Module) -> float:
    """Fraction of zero weights over the block Linear layers (what pruning targets)."""
    zeros = total = 0
    for _, lin in iter_block_linears(model):
        w = lin.dequantize() if hasattr(lin, "dequantize") else lin.weight
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / max(total, 1)
