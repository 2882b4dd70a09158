"""Generative pretraining (GPT-1 §3.1, GPT-2, GPT-3): `gptlab pretrain`."""

from gptlab.pretrain.stage import pretrain

__all__ = ["pretrain"]
