"""gptlab: the GPT lineage end to end (GPT-1 → GPT-2 → GPT-3 → InstructGPT), readable and fast."""

__version__ = "0.1.0"
