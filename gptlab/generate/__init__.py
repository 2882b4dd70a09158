"""Generation: KV cache, batched decoding, sampling controls, beam search, streaming."""

from gptlab.generate.cache import KVCache
from gptlab.generate.generator import Completion, Generator
from gptlab.generate.params import SamplingParams

__all__ = ["Completion", "Generator", "KVCache", "SamplingParams"]
