"""Compression: INT8 weight-only and LLM.int8() quantization, GPTQ, magnitude / N:M / structured pruning,
and one-shot SparseGPT. Every method writes a run dir that `gptlab.run.load_run` loads unchanged.

What each format buys on CPU (measured in benchmarks/compress.py):
- int8 weight-only (Int8Linear): ~4× smaller than fp32, and faster batch-1 decoding (decoding is
  memory-bound; the weights are streamed as int8).
- LLM.int8(): ~4× smaller; slower than fp32 on CPU (per-call activation quantization + outlier split).
- 4-bit RTN/GPTQ (IntNLinear): ~6-8× smaller on disk; faster batch-1 decoding where torch has its int4 CPU
  kernel (used if present, built from our own on-disk layout); 2-3-bit and long inputs: dequantized per call.
- unstructured / N:M sparsity: neither smaller nor faster (stored dense); they measure accuracy at a pattern.
- structured pruning (heads, FFN channels): fewer parameters, smaller and faster everywhere.
"""

from gptlab.compress.api import prune, quantize, quantize_model, report, sparsegpt, sparsegpt_model

__all__ = ["prune", "quantize", "quantize_model", "report", "sparsegpt", "sparsegpt_model"]
