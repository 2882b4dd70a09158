"""How gptlab runs on the machine at hand: the compute dtype by hardware capability (`auto`), the measured
matmul peak behind MFU, and allocator settings. Nothing above this layer inspects the hardware itself."""

from gptlab.runtime.alloc import peak_memory_mb, tune_cpu_allocator
from gptlab.runtime.capability import cpu_bf16_native, describe_cpu, onednn_bf16
from gptlab.runtime.dtype import (INFER_DTYPES, TRAIN_DTYPES, autocast, canonical_dtype, dtype_arg, dtype_name,
                                  linear_shape, resolve_dtype, warn_if_slow)
from gptlab.runtime.matmul import matmul_flops, peak_flops

__all__ = ["INFER_DTYPES", "TRAIN_DTYPES", "autocast", "canonical_dtype", "cpu_bf16_native", "describe_cpu",
           "dtype_arg", "dtype_name", "linear_shape", "matmul_flops", "onednn_bf16", "peak_flops", "peak_memory_mb", "resolve_dtype",
           "tune_cpu_allocator", "warn_if_slow"]
