"""Constrained decoding: a grammar over the tokenizer's vocabulary decides which tokens may come next.

The token-level automaton is llguidance's (Microsoft's Earley parser over a token trie, also vLLM's and
llama.cpp's backend): it takes any vocabulary given as the bytes of each id, so it handles our
tiktoken-style byte-level BPE, character and omni tokenizers alike. Grammars are JSON Schemas, regexes,
choice lists and Lark grammars; `compile_grammar` turns each into llguidance's grammar string.

Per token, each constrained row fills one row of a bit mask (32 ids per int32, llguidance's layout);
`apply_masks` expands all constrained rows at once and sets disallowed ids to -inf.
"""

from __future__ import annotations

import json
import re
import threading

import torch

from gptlab.errors import GptlabError

# compact JSON: no free whitespace, so a model cannot stall in endless newlines inside an object
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_SHIFTS = torch.arange(32, dtype=torch.int32)
_lock = threading.Lock()
_tokenizers: dict[int, tuple] = {}  # id(tokenizer) -> (tokenizer, LLTokenizer): built once (~0.3 s for 50k ids)


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise GptlabError("structured output needs llguidance: pip install 'gptlab[serve]'") from None
    return llguidance


def stop_tokens(tok) -> list[int]:
    """The ids that end a constrained reply: <|endoftext|> and the chat template's <|end|>."""
    return [tok.eot_id] + [i for name, i in tok.special_tokens.items() if name == "<|end|>"]


def ll_tokenizer(tok):
    """llguidance's view of `tok`: each id's bytes; special tokens (role markers, media codes) are
    marked so that no grammar can produce them."""
    with _lock:
        hit = _tokenizers.get(id(tok))
        if hit is not None and hit[0] is tok:
            return hit[1]
        llg = _llguidance()
        special, n = set(tok.special_tokens.values()), tok.vocab_size
        raw = [b"" if i in special else tok.decode_bytes([i]) for i in range(n)]
        marked = [i for i in range(n) if not raw[i]]  # special, or a media code (no text): never grammar output

        class _Vocab:
            eos_token_id, bos_token_id, special_token_ids = tok.eot_id, None, marked
            tokens = [b or b"\xff" + f"<|special_{i}|>".encode() for i, b in enumerate(raw)]

            def __call__(self, s):
                return tok.encode(s.decode("utf-8", errors="replace") if isinstance(s, bytes) else s)

        ll = llg.LLTokenizer(llg.TokenizerWrapper(_Vocab()), n_vocab=n, eos_token=stop_tokens(tok))
        _tokenizers[id(tok)] = (tok, ll)
        return ll


def compile_grammar(kind: str, spec) -> str:
    """("json", schema dict or None for any object) | ("regex", str) | ("choice", [str]) | ("lark", str)
    -> llguidance's grammar string; a bad spec raises GptlabError (one line)."""
    llg = _llguidance()
    M = llg.LLMatcher
    try:
        if kind == "json":
            schema = {"type": "object"} if spec is None else spec
            if isinstance(schema, str):
                schema = json.loads(schema)
            grammar = M.grammar_from_json_schema(schema, defaults=JSON_STYLE)
        elif kind == "regex":
            grammar = M.grammar_from_regex(spec)
        elif kind == "choice":
            grammar = M.grammar_from_regex("|".join(re.escape(c) for c in spec))
        elif kind == "lark":
            grammar = M.grammar_from_lark(spec)
        else:
            raise GptlabError(f"unknown grammar kind {kind!r}")
    except (ValueError, TypeError) as e:
        raise GptlabError(f"invalid {kind} constraint: {e}") from None
    error = M.validate_grammar(grammar)
    if error:
        raise GptlabError(f"invalid {kind} constraint: {error.strip().splitlines()[0]}")
    return grammar


class Constraint:
    """One row's grammar state: fill its mask row, then push the token it sampled."""

    def __init__(self, tok, grammar: str):
        llg = _llguidance()
        self.matcher = llg.LLMatcher(ll_tokenizer(tok), grammar, log_level=0)
        if self.matcher.is_error():
            raise GptlabError(f"grammar rejected: {self.matcher.get_error()}")

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        v = bitmask[row]
        self.matcher.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())

    def push(self, token: int) -> None:
        if not self.matcher.consume_token(token):  # only a logits processor outside the mask can cause this
            raise GptlabError(f"token {token} broke the grammar: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The grammar is complete and admits nothing more: the row stops here."""
        return self.matcher.is_stopped()


def apply_masks(logits: torch.Tensor, rows: list[int], constraints: list[Constraint]) -> torch.Tensor:
    """logits (B, V); rows[i] is the batch row constraints[i] governs. Disallowed ids -> -inf, in place."""
    V = logits.size(-1)
    bits = torch.full((len(rows), (V + 31) // 32), -1, dtype=torch.int32)
    for j, c in enumerate(constraints):
        c.fill(bits, j)
    allowed = ((bits[:, :, None] >> _SHIFTS) & 1).view(len(rows), -1)[:, :V].bool()  # (R, V)
    idx = torch.tensor(rows, device=logits.device)
    logits[idx] = logits[idx].masked_fill(~allowed.to(logits.device), float("-inf"))
    return logits
