"""Prepacked oneDNN weights for CPU decoding.

Decoding reads every weight once per step, so its speed is the speed of streaming matrices through
small matmuls (1–8 rows). For several rows oneDNN's prepacked ("blocked") weight layout streams far
better than the plain (out, in) matrix (measured, GPT-2-sized layers at 8 rows: fp32 32.7 vs 4.7 GB/s on
an AVX-512 CPU; 10.6 vs 7.4 GB/s on an AMX one); a single row goes to F.linear's gemv, which streamed
faster than the packed kernel (GPT-2 124M batch-1 decode, fp32, AMX CPU: 24.6–28.7 vs 21.9–23.5 tok/s,
interleaved). This is the prepacking torch.compile's CPU backend
does under freezing; here it is applied to an eager model.

Each nn.Linear keeps its parameter (training, saving and export see the same module) and gains a packed
copy used only under no-grad CPU inference; the copy is rebuilt when the weight changes in place (an
optimizer step bumps the tensor's version), so a policy that trains between rollouts stays correct.
Memory: one extra copy of the Linear weights.

oneDNN packs bf16 only where the CPU has a bf16 kernel (avx512bw/vl/dq, avx_ne_convert or better): on an
AVX2-only CPU it raises. Such weights keep F.linear (slow in bf16 there, which `gptlab.runtime` says when
bf16 was asked for; `auto` never picks it).
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.runtime import onednn_bf16


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _pack(mod: nn.Linear) -> None:
    w = mod.weight.detach()
    mod._packed_key = (w._version, w.dtype, w.data_ptr())
    mod._packed = None
    if w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and onednn_bf16()):
        try:
            mod._packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1)
        except RuntimeError:  # no oneDNN kernel for this dtype on this CPU (e.g. a forced capability)
            mod._packed = None


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != w.dtype or torch.is_autocast_enabled("cpu"):
        return F.linear(x, w, self.bias)  # training, another device or dtype, or autocast's own casting
    if self._packed_key != (w._version, w.dtype, w.data_ptr()):
        _pack(self)
    if self._packed is None or x.numel() == x.size(-1):
        return F.linear(x, w, self.bias)  # one row: gemv streams faster than the packed kernel (fp32 +18%, measured)
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.size(-1)), self._packed, self.bias, "none", [], "")
    return y.view(*x.shape[:-1], y.size(-1))


def pack_linears(model: nn.Module) -> bool:
    """Give every nn.Linear of `model` a packed CPU inference path. Returns False where unavailable."""
    if not available():
        return False
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and mod.weight.device.type == "cpu" and not hasattr(mod, "_packed"):
            _pack(mod)
            mod.forward = types.MethodType(_packed_forward, mod)
    return True
