"""Interop with other ecosystems: Hugging Face transformers checkpoints (GPT-2 and GPT-1 layouts)."""

from gptlab.interop.hf import export_hf, import_hf

__all__ = ["import_hf", "export_hf"]
