"""GPTConfig and the named presets of the lineage: GPT-1, GPT-2, GPT-3 are one model, configured."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from gptlab.config import check_ranges, coerce
from gptlab.errors import GptlabError

ATTENTION_KINDS = ("dense", "local", "strided", "fixed")
HEAD_KINDS = ("", "classifier", "scalar")


@dataclass
class GPTConfig:
    vocab_size: int = field(default=50257, metadata={"help": "embedding rows (≥ the tokenizer's vocab size)"})
    block_size: int = field(default=1024, metadata={"help": "context length (learned position embeddings)"})
    n_layer: int = field(default=12, metadata={"help": "transformer blocks"})
    n_head: int = field(default=12, metadata={"help": "attention heads"})
    n_embd: int = field(default=768, metadata={"help": "model width d_model"})
    head_dim: int = field(default=0, metadata={"help": "d_head; 0 = n_embd // n_head (GPT-3 13B has 40×128 ≠ 5140)"})
    d_ff: int = field(default=0, metadata={"help": "FFN width; 0 = 4·n_embd"})
    norm: str = field(default="pre", metadata={"help": "'post' (GPT-1: LN after each residual add) or 'pre' (GPT-2/3)"})
    activation: str = field(default="gelu_tanh", metadata={"help": "'gelu_tanh' (GPT-1 and GPT-2's tanh approximation) or 'gelu' (exact erf)"})
    embd_pdrop: float = field(default=0.0, metadata={"help": "dropout on token+position embeddings"})
    attn_pdrop: float = field(default=0.0, metadata={"help": "dropout on attention probabilities"})
    resid_pdrop: float = field(default=0.0, metadata={"help": "dropout on each residual branch output"})
    bias: bool = field(default=True, metadata={"help": "biases in Linear layers and LayerNorms"})
    ln_eps: float = field(default=1e-5, metadata={"help": "LayerNorm epsilon"})
    init_std: float = field(default=0.02, metadata={"help": "N(0, std) init of weights and embeddings"})
    scaled_residual_init: bool = field(default=True, metadata={"help": "GPT-2: scale residual projections by 1/sqrt(2·n_layer) at init"})
    tie_embeddings: bool = field(default=True, metadata={"help": "LM head shares the token embedding matrix"})
    attention: tuple = field(default=("dense",), metadata={"help": "per-layer attention pattern, cycled over layers: dense|local|strided|fixed (GPT-3: dense,local)"})
    local_window: int = field(default=256, metadata={"help": "band width of 'local' layers: a query sees itself and the previous window-1 tokens"})
    sparse_stride: int = field(default=128, metadata={"help": "stride of the Sparse Transformer 'strided' and 'fixed' patterns"})
    sparse_c: int = field(default=8, metadata={"help": "summary columns per block of the 'fixed' pattern"})
    attn_backend: str = field(default="auto", metadata={"help": "auto|sdpa|flex|naive; sparse layers use FlexAttention block masks under 'flex'"})
    # task head over the final hidden state (GPT-1 fine-tuning): Dropout(head_pdrop) then Linear(n_embd, head_out)
    head: str = field(default="", metadata={"help": "task head: '' (none) | 'classifier' (head_out classes) | 'scalar' (one score, e.g. per choice)"})
    head_out: int = field(default=0, metadata={"help": "task head outputs: the number of classes (≥ 2) for 'classifier', 1 for 'scalar', 0 without a head"})
    head_pdrop: float = field(default=0.1, metadata={"help": "dropout before the task head (GPT-1: 0.1)"})

    def __post_init__(self) -> None:
        if isinstance(self.attention, str):
            self.attention = tuple(a.strip() for a in self.attention.split(",") if a.strip())
        self.attention = tuple(self.attention)
        if self.head_dim == 0:
            if self.n_embd % self.n_head:
                raise GptlabError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}; set head_dim")
            self.head_dim = self.n_embd // self.n_head
        if self.d_ff == 0:
            self.d_ff = 4 * self.n_embd
        for a in self.attention:
            if a not in ATTENTION_KINDS:
                raise GptlabError(f"unknown attention pattern {a!r}; choose from {', '.join(ATTENTION_KINDS)}")
        if self.norm not in ("pre", "post"):
            raise GptlabError(f"norm must be 'pre' or 'post', got {self.norm!r}")
        if self.activation not in ("gelu", "gelu_tanh"):
            raise GptlabError(f"activation must be 'gelu' or 'gelu_tanh', got {self.activation!r}")
        if self.attn_backend not in ("auto", "sdpa", "flex", "naive"):
            raise GptlabError(f"attn_backend must be auto|sdpa|flex|naive, got {self.attn_backend!r}")
        if min(self.vocab_size, self.block_size, self.n_layer, self.n_head, self.n_embd) <= 0:
            raise GptlabError("vocab_size, block_size, n_layer, n_head and n_embd must be positive")
        if self.head not in HEAD_KINDS:
            raise GptlabError(f"head must be '', 'classifier' or 'scalar', got {self.head!r}")
        if self.head == "scalar" and self.head_out == 0:
            self.head_out = 1
        want = {"": "0", "classifier": "≥ 2", "scalar": "1"}[self.head]
        if isinstance(self.head_out, bool) or not isinstance(self.head_out, int) or \
                not {"": self.head_out == 0, "classifier": self.head_out >= 2, "scalar": self.head_out == 1}[self.head]:
            raise GptlabError(f"head_out must be {want} for head {self.head!r}, got {self.head_out!r}")
        check_ranges(self, "model", (
            *((k, 0.0 <= getattr(self, k) < 1.0, "in [0, 1)") for k in ("embd_pdrop", "attn_pdrop", "resid_pdrop", "head_pdrop")),
            ("head_dim", self.head_dim >= 1, "≥ 1 (0: n_embd / n_head)"), ("d_ff", self.d_ff >= 1, "≥ 1 (0: 4·n_embd)"),
            ("ln_eps", self.ln_eps > 0, "> 0"), ("init_std", self.init_std > 0, "> 0"),
            ("local_window", self.local_window >= 1, "≥ 1"), ("sparse_stride", self.sparse_stride >= 1, "≥ 1"),
            ("sparse_c", "fixed" not in self.attention or 1 <= self.sparse_c <= self.sparse_stride,
             "in [1, sparse_stride] for 'fixed' layers")))

    def layer_attention(self, layer: int) -> str:
        return self.attention[layer % len(self.attention)]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["attention"] = list(self.attention)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """A saved or given model config: keys checked, values coerced and validated (one-line errors)."""
        if not isinstance(d, dict):
            raise GptlabError(f"a model config is a mapping of keys to values, got {type(d).__name__}")
        return cls(**coerce(cls, d, "model"))

    def num_params(self, include_position: bool = True) -> int:
        """Exact parameter count, computed from the shapes (no allocation)."""
        C, A, F, b = self.n_embd, self.n_head * self.head_dim, self.d_ff, int(self.bias)
        ln = C * (1 + b)
        attn = C * 3 * A + 3 * A * b + A * C + C * b
        mlp = C * F + F * b + F * C + C * b
        block = attn + mlp + 2 * ln
        n = self.vocab_size * C + self.n_layer * block
        n += ln if self.norm == "pre" else 0  # final LayerNorm
        n += 0 if self.tie_embeddings else self.vocab_size * C
        n += (C + 1) * self.head_out if self.head else 0  # task head: Linear(C, head_out) with bias
        return n + (self.block_size * C if include_position else 0)


# --- presets -------------------------------------------------------------------------------------
_GPT1 = dict(vocab_size=40478, block_size=512, n_layer=12, n_head=12, n_embd=768, norm="post", activation="gelu_tanh",
             embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1, scaled_residual_init=False)
_GPT2 = dict(vocab_size=50257, block_size=1024, norm="pre", activation="gelu_tanh", scaled_residual_init=True,
             embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)
# GPT-3 paper, Table 2.1: n_layer, d_model, n_heads, d_head (d_ff = 4·d_model, context 2048). The table's
# XL row (24 heads × 128 = 3072 ≠ d_model 2048) contradicts its own 1.3B label; we use 16 × 128 (= 2048),
# as GPT-Neo 1.3B did. 13B keeps 40 × 128 = 5120 attention width inside d_model 5140, as tabled.
_GPT3_TABLE = {
    "gpt3-small": (12, 768, 12, 64), "gpt3-medium": (24, 1024, 16, 64), "gpt3-large": (24, 1536, 16, 96),
    "gpt3-xl": (24, 2048, 16, 128), "gpt3-2.7b": (32, 2560, 32, 80), "gpt3-6.7b": (32, 4096, 32, 128),
    "gpt3-13b": (40, 5140, 40, 128), "gpt3-175b": (96, 12288, 96, 128),
}

PRESETS: dict[str, dict] = {
    "gpt1": _GPT1,
    "gpt2": dict(_GPT2, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(_GPT2, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(_GPT2, n_layer=48, n_head=25, n_embd=1600),
    **{name: dict(_GPT2, block_size=2048, n_layer=L, n_embd=d, n_head=h, head_dim=dh, embd_pdrop=0.0, attn_pdrop=0.0,
                  resid_pdrop=0.0, attention=("dense", "local"), local_window=256)
       for name, (L, d, h, dh) in _GPT3_TABLE.items()},
    # small CPU presets for demos and tests (vocab set from the tokenizer when training). They use the exact
    # erf GELU, as nanoGPT does: ATen's tanh-approximate GELU is ~4× slower on CPU (measured, fwd+bwd).
    "tiny": dict(_GPT2, activation="gelu", vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64, embd_pdrop=0.0,
                 attn_pdrop=0.0, resid_pdrop=0.0),
    "small-4x128": dict(_GPT2, activation="gelu", block_size=256, n_layer=4, n_head=4, n_embd=128, embd_pdrop=0.0, attn_pdrop=0.0,
                        resid_pdrop=0.0),
    "small-6x384": dict(_GPT2, activation="gelu", block_size=256, n_layer=6, n_head=6, n_embd=384, embd_pdrop=0.2, attn_pdrop=0.2,
                        resid_pdrop=0.2),
}

# What the papers report (GPT-2/GPT-3 labels are rounded; the released GPT-2 models have 124M/355M/774M/1558M).
PAPER_PARAMS = {
    "gpt1": 117e6, "gpt2": 124e6, "gpt2-medium": 355e6, "gpt2-large": 774e6, "gpt2-xl": 1558e6,
    "gpt3-small": 125e6, "gpt3-medium": 350e6, "gpt3-large": 760e6, "gpt3-xl": 1.3e9, "gpt3-2.7b": 2.7e9,
    "gpt3-6.7b": 6.7e9, "gpt3-13b": 13e9, "gpt3-175b": 175e9,
}


def preset(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise GptlabError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **coerce(GPTConfig, overrides, "model")})
