"""The GPT family: one model class, the lineage as configuration."""

from gptlab.model.config import PAPER_PARAMS, PRESETS, GPTConfig, preset
from gptlab.model.gpt import GPT

__all__ = ["GPT", "GPTConfig", "PRESETS", "PAPER_PARAMS", "preset"]
