"""Quantized Linear modules and the quantizers behind them.

- `Int8Linear`: weight-only INT8, per-output-channel symmetric absmax (w ≈ q · s, q ∈ [-127, 127]).
  Real int8 storage; decoding-sized inputs run `aten._weight_int8pack_mm` with bf16 activations (the
  int8 weights are streamed once and widened inside the kernel; an ATen kernel, fast on AVX2 too), long
  inputs dequantize + one GEMM in bf16 where the CPU multiplies bf16 natively, else in fp32.
- `LLMInt8Linear`: LLM.int8() (Dettmers et al. 2022): vector-wise int8 for activations (per row of x)
  and weights (per output row), with the outlier feature columns (|x| ≥ threshold in any row) kept
  out of the int8 path and multiplied in floating point.
- `IntNLinear`: 2–4-bit weights (RTN or GPTQ), asymmetric min/max per output channel or per group of
  input columns, two codes packed per byte (our own layout, independent of torch versions). For decoding
  4-bit layers use torch's int4 CPU kernel where this torch has it (its layout is built in memory from
  ours: one extra 4-bit copy); otherwise, and for long inputs, the weights are dequantized per call.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.errors import GptlabError
from gptlab.runtime import cpu_bf16_native


# --- quantizers (pure functions) -------------------------------------------------------------------
def absmax_scale(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric per-row scale (out,): the row's absmax maps to 2^(bits-1) - 1. All-zero rows get scale 1."""
    qmax = 2 ** (bits - 1) - 1
    s = w.detach().abs().amax(dim=1).float() / qmax
    return torch.where(s > 0, s, torch.ones_like(s))


def quantize_symmetric(w: torch.Tensor, scale: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """w (out, in), scale (out,) -> int8 codes, round to nearest: |w - q·s| ≤ s/2 inside the range."""
    qmax = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(w.float() / scale[:, None]), -qmax, qmax).to(torch.int8)


def minmax_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric (GPTQ's default) params per row of w (rows, cols): scale and integer zero point, with
    the range widened to include 0 so that pruned (zero) weights stay exactly zero."""
    maxq = 2 ** bits - 1
    lo = torch.clamp(w.float().amin(dim=1), max=0)
    hi = torch.clamp(w.float().amax(dim=1), min=0)
    flat = (hi - lo) == 0
    lo, hi = torch.where(flat, torch.full_like(lo, -1.0), lo), torch.where(flat, torch.ones_like(hi), hi)
    scale = (hi - lo) / maxq
    zero = torch.round(-lo / scale)
    return scale, zero


def quantize_asym(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2^bits - 1]; scale/zero broadcast against w."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, 2 ** bits - 1)


def group_params(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, G) scales and zeros, one per row and group of `group_size` input columns (G = 1: per channel)."""
    out, cols = w.shape
    g = group_size or cols
    if cols % g:
        raise GptlabError(f"group_size {group_size} does not divide the layer's {cols} input columns")
    s, z = minmax_params(w.reshape(out * (cols // g), g), bits)
    return s.view(out, cols // g), z.view(out, cols // g)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) codes in [0, 15], in even -> (out, in/2) uint8: low nibble = even column."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(out, in/2) uint8 -> (out, in) uint8 codes."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


# --- modules ---------------------------------------------------------------------------------------
SMALL_M = 32  # rows up to which the int8 weight-streaming kernel beats dequantize + bf16 GEMM (measured)


def _gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the dequantize + GEMM path: bf16 (half the traffic) where the CPU multiplies bf16
    natively; fp32 on CPUs without it, where oneDNN's bf16 GEMM is a slow fallback (measured 4× slower
    than fp32 at 256 rows with AVX2 kernels)."""
    if x.device.type != "cpu":
        return x.dtype
    return torch.bfloat16 if cpu_bf16_native()[0] else torch.float32


def _needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


_HAS_INT8_KERNEL = hasattr(torch.ops.aten, "_weight_int8pack_mm")
_HAS_INT4_KERNEL = all(hasattr(torch.ops.aten, op) for op in ("_weight_int4pack_mm_for_cpu",
                                                               "_convert_weight_to_int4pack_for_cpu"))


class Int8Linear(nn.Module):
    """Weight-only INT8: y = x · (q · s)ᵀ + b, q int8 (out, in), s (out,)."""

    kind = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=dtype or torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, weight: torch.Tensor | None = None) -> "Int8Linear":
        w = (lin.weight if weight is None else weight).detach()
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, device=w.device)
        s = absmax_scale(w, 8)
        m.weight_int8.copy_(quantize_symmetric(w, s, 8))
        m.weight_scale.copy_(s)
        if lin.bias is not None:
            m.bias.data.copy_(lin.bias.detach().float())
        return m

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return self.weight_int8.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        # Weight-only int8 computes in bf16, as torchao's int8 weight-only does. Measured on this CPU (1 thread,
        # 768→3072): at ≤ 16 rows `_weight_int8pack_mm` with bf16 activations streams the int8 weights ~4-7×
        # faster than fp32 packed oneDNN (its fp32-activation path is ~15× slower: no fast kernel); at 64+ rows
        # (prefill, perplexity) dequantizing to bf16 and one bf16 GEMM is faster.
        x2 = x.reshape(-1, self.in_features)
        # the int8 kernel has no backward: a gradient to the input (QLoRA's frozen base) takes the GEMM path
        if x2.size(0) <= SMALL_M and _HAS_INT8_KERNEL and x.device.type == "cpu" and not _needs_grad(x):
            s = self.weight_scale
            sb = self._scale_bf16 if self._scale_src is s and self._scale_ver == s._version else self._refresh_scale()
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight_int8, sb)
        else:
            cdt = _gemm_dtype(x)
            y = F.linear(x2.to(cdt), self.dequantize(cdt))
        # one op: adding the (fp32 or bf16) bias also casts the bf16 result back up to the model's dtype
        y = y.to(x.dtype) if self.bias is None else torch.add(self.bias, y).to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    _scale_src = None  # the weight_scale tensor whose bf16 copy is cached (decoding needs it per layer per token)

    def _refresh_scale(self) -> torch.Tensor:
        s = self.weight_scale
        self._scale_bf16, self._scale_src, self._scale_ver = s.to(torch.bfloat16), s, s._version
        return self._scale_bf16

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@functools.lru_cache(maxsize=1)
def _int_mm_exact() -> bool:
    """Whether torch._int_mm gives exact int32 sums here. Without VNNI (AVX2-only CPUs) oneDNN multiplies
    u8·s8 pairs into saturating int16 sums: errors of 10^4-10^5 measured with AVX2 kernels. Checked once."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (32, 64), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (64, 32), dtype=torch.int8, generator=g)
    try:
        return torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long())
    except (RuntimeError, AttributeError):
        return False


def _int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) @ int8 (N, K)ᵀ -> int32 (M, N), exact: torch._int_mm where it is exact and runs (its
    shape limits), else fp32 GEMMs over ≤ 1024 columns (products of |q| ≤ 127 sum exactly below 2^24)."""
    if _int_mm_exact():
        try:
            return torch._int_mm(a, b.t())
        except RuntimeError:
            pass
    out = torch.zeros(a.size(0), b.size(0), dtype=torch.int32, device=a.device)
    for s in range(0, a.size(1), 1024):
        out += (a[:, s:s + 1024].float() @ b[:, s:s + 1024].float().t()).to(torch.int32)
    return out


class LLMInt8Linear(Int8Linear):
    """LLM.int8(): y = X_o · W_oᵀ (floating point, outlier columns o) + s_x s_wᵀ ⊙ (Q(X_r) · Q(W_r)ᵀ) (int8).

    Outlier columns are found per call: input features where any row has |x| ≥ threshold (6.0 in the
    paper). Their activations are never quantized; their weight columns are the int8 weights
    dequantized (as bitsandbytes does). Everything else is vector-wise int8 with int32 accumulation.
    """

    kind = "llm-int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, threshold: float = 6.0,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)  # the same int8 weights
        self.threshold = float(threshold)

    @classmethod
    def from_linear(cls, lin: nn.Linear, threshold: float = 6.0) -> "LLMInt8Linear":
        m = super().from_linear(lin)
        m.threshold = float(threshold)
        return m

    def outlier_columns(self, x2: torch.Tensor) -> torch.Tensor:
        return (x2.abs() >= self.threshold).any(dim=0)  # (in,) bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()  # (M, K)
        out = self.outlier_columns(x2)
        y = torch.zeros(x2.size(0), self.out_features, dtype=torch.float32, device=x.device)
        if out.any():  # mixed-precision decomposition: outlier features stay in floating point
            y += x2[:, out] @ (self.weight_int8[:, out].float() * self.weight_scale.float()[:, None]).t()
        reg = ~out
        if reg.any():
            xr = x2[:, reg]
            sx = xr.abs().amax(dim=1).clamp_min(1e-12) / 127  # (M,) vector-wise: one scale per row of X
            qx = torch.round(xr / sx[:, None]).clamp(-127, 127).to(torch.int8)
            wr = self.weight_int8 if out.sum() == 0 else self.weight_int8[:, reg].contiguous()
            acc = _int8_matmul(qx, wr)  # (M, N) int32
            y += acc.float() * sx[:, None] * self.weight_scale.float()[None, :]
        if self.bias is not None:
            y += self.bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold}"


class IntNLinear(nn.Module):
    """2–4-bit weights, asymmetric per (row, group): w ≈ s · (q - z), codes packed two per byte."""

    kind = "intn"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4, group_size: int = 0,
                 device=None, dtype=None):
        super().__init__()
        if not 2 <= bits <= 4:
            raise GptlabError(f"packed weights hold 2 to 4 bits, got {bits}")
        if in_features % 2:
            raise GptlabError(f"4-bit packing needs an even number of input features, got {in_features}")
        g = group_size or in_features
        if in_features % g:
            raise GptlabError(f"group_size {group_size} does not divide the layer's {in_features} input columns")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        n_groups = in_features // g
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=dtype or torch.float32, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_codes(cls, lin: nn.Linear, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   group_size: int) -> "IntNLinear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, bits, group_size, device=codes.device)
        m.qweight.copy_(pack_nibbles(codes))
        m.scales.copy_(scales)
        m.zeros.copy_(zeros.to(torch.uint8))
        if lin.bias is not None:
            m.bias.data.copy_(lin.bias.detach().float())
        return m

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        g = self.group_size or self.in_features
        q = unpack_nibbles(self.qweight).to(dtype).view(self.out_features, -1, g)  # (out, G, g)
        w = (q - self.zeros.to(dtype)[..., None]) * self.scales.to(dtype)[..., None]
        return w.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        small = x2.size(0) <= SMALL_M and x.device.type == "cpu" and not _needs_grad(x)  # (no backward in the kernel)
        kg = self._int4_kernel_group() if small else 0
        if kg:
            # decoding: torch's int4 CPU kernel (if this torch has it) reads the 4-bit codes directly; in bf16,
            # as its fp32 path is many times slower (measured)
            wp, sz = self._int4_operands(kg, torch.bfloat16)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), wp, kg, sz)
        else:  # dequantized per call: smaller, not faster
            cdt = _gemm_dtype(x)
            y = F.linear(x2.to(cdt), self.dequantize(cdt))
        y = (y if self.bias is None else torch.add(self.bias, y)).to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def _int4_kernel_group(self) -> int:
        """Group size to run torch's int4 kernel with (it takes 32/64/128/256 and N % 16 == 0; a per-channel
        or larger group is expressed as repeated groups), or 0 where it does not apply."""
        if not _HAS_INT4_KERNEL or self.bits != 4 or self.out_features % 16:
            return 0
        g = self.group_size or self.in_features
        return next((kg for kg in (256, 128, 64, 32) if g % kg == 0), 0)

    def _int4_operands(self, kg: int, dtype: torch.dtype):
        """The kernel's layout of our codes and its (scale, offset) pairs, built once and cached (an extra
        4-bit copy of the weights), rebuilt if the buffers change. Its convention: w = (q - 8)·s + o, so
        o = s·(8 - zero)."""
        bufs = (self.qweight, self.scales, self.zeros)
        key = tuple((id(t), t._version) for t in bufs) + (kg, dtype)
        if getattr(self, "_int4_key", None) != key:
            wp = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(self.qweight).to(torch.int32), 1)
            rep = (self.group_size or self.in_features) // kg
            sc = self.scales.float().repeat_interleave(rep, dim=1)  # (out, in / kg)
            off = sc * (8 - self.zeros.float().repeat_interleave(rep, dim=1))
            sz = torch.stack([sc, off], dim=-1).transpose(0, 1).contiguous().to(dtype)  # (in / kg, out, 2)
            self._int4_ops, self._int4_key, self._int4_refs = (wp, sz), key, bufs
        return self._int4_ops

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}"


def rtn_intn(lin: nn.Linear, bits: int, group_size: int, weight: torch.Tensor | None = None) -> IntNLinear:
    """Round-to-nearest 2–4-bit quantization of a Linear (the GPTQ baseline)."""
    w = (lin.weight if weight is None else weight).detach().float()
    s, z = group_params(w, bits, group_size)
    g = group_size or w.size(1)
    codes = quantize_asym(w.view(w.size(0), -1, g), s[..., None], z[..., None], bits).view_as(w)
    return IntNLinear.from_codes(lin, codes, s, z, bits, group_size)
