"""Hugging Face <-> gptlab: GPT-2 (`GPT2LMHeadModel`) and GPT-1 (`OpenAIGPTLMHeadModel`) checkpoints.

Both HF layouts are our GPT with other names: HF's Conv1D stores weights as (in, out) where our
nn.Linear stores (out, in), GPT-1 calls the embeddings tokens_embed/positions_embed and has no final LN.
Tokenizers travel as GPT-2's byte-level BPE files (vocab.json + merges.txt, bytes shown through GPT-2's
byte-to-unicode table). Nothing here imports transformers: the files are read and written directly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch

from gptlab.chat.jinja import TEMPLATE_FILE, read_hf_template
from gptlab.errors import GptlabError
from gptlab.model import GPT, GPTConfig
from gptlab.run import check_vocab, load_run, write_run_config
from gptlab.tokenizer import EOT, BPETokenizer, Tokenizer, build_tokenizer
from gptlab.tokenizer.bpe import GPT2_PATTERN
from gptlab.run.format import MODEL_FILE, load_state_into, model_state, read_safetensors, save_model
from gptlab.fileio import read_json, save_tensors

_CONV1D = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
_BUFFERS = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|position_ids)$")  # causal masks etc., not weights
_GPT1_NAMES = {"tokens_embed.weight": "wte.weight", "positions_embed.weight": "wpe.weight"}
_GPT1_TO_HF = {v: k for k, v in _GPT1_NAMES.items()}
# HF activation name -> ours, per model_type. gelu_pytorch_tanh is gelu_new's tanh formula computed by ATen.
# OpenAIGPT's afn "gelu" is the tanh approximation (its ACT_FNS maps it to gelu_new, as GPT-1's code had it),
# so an exact-erf post-LN model has no HF GPT-1 form.
_ACT_FROM_HF = {"gpt2": {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"},
                "openai-gpt": {"gelu": "gelu_tanh"}}
_ACT_TO_HF = {"gpt2": {"gelu_tanh": "gelu_new", "gelu": "gelu"}, "openai-gpt": {"gelu_tanh": "gelu"}}
# HF config defaults (GPT2Config / OpenAIGPTConfig) for fields a config.json may leave out.
_DEFAULTS = {
    "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, activation_function="gelu_new"),
    "openai-gpt": dict(vocab_size=40478, n_positions=512, n_embd=768, n_layer=12, n_head=12, afn="gelu"),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: printable bytes map to themselves, the rest to U+0100.. so every token is visible text."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in bs]
    return {**{b: chr(b) for b in bs}, **{b: chr(256 + n) for n, b in enumerate(rest)}}


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GptlabError(f"{out} already exists and is not empty; choose a new output directory")


@contextmanager
def _staged_dir(out: Path):
    """Yield a fresh temp dir beside `out`, renamed to `out` on success: no half-written output, ever."""
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty (checked above); os.replace cannot replace a directory on every OS
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- import ------------------------------------------------------------------------------------------
def _load_hf_weights(d: Path) -> tuple[dict[str, torch.Tensor], str]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):  # sharded checkpoints
        if (d / index).is_file():
            wmap = read_json(d / index, "HF weight index")
            wmap = wmap.get("weight_map") if isinstance(wmap, dict) else None
            if not isinstance(wmap, dict) or not wmap:
                raise GptlabError(f"{d / index} has no weight_map")
            sd = {}
            for f in sorted(set(wmap.values())):
                sd.update(_read_weight_file(d / f))
            return sd, index
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (d / name).is_file():
            return _read_weight_file(d / name), name
    raise GptlabError(f"{d}: no model weights (expected model.safetensors or pytorch_model.bin)")


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return read_safetensors(path, "HF weights")
    if not path.is_file():
        raise GptlabError(f"HF weights not found: {path}")
    try:  # weights_only: a .bin is a pickle, and we never run a pickle's code
        sd = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises many types for truncated zips, bad pickles, forbidden globals
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            # torch's own message suggests weights_only=False, which would run the pickle's code: never
            raise GptlabError(f"HF weights {path} hold Python objects besides tensors (a pickle that would run "
                              "code to load); gptlab does not unpickle them. Convert the checkpoint to "
                              "safetensors with a tool you trust, then import that") from None
        raise GptlabError(f"HF weights {path} are corrupt or not a plain weights file ({_one_line(e)})") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise GptlabError(f"HF weights {path} do not hold a flat name -> tensor state dict")
    return sd


def _config_from_hf(c: dict, where: Path) -> tuple[GPTConfig, str]:
    mt = c.get("model_type") if isinstance(c, dict) else None
    if mt not in _DEFAULTS:
        raise GptlabError(f"{where}: unsupported model_type {mt!r}; gptlab imports 'gpt2' (GPT-2) and 'openai-gpt' (GPT-1)")
    c = {**_DEFAULTS[mt], **{k: v for k, v in c.items() if v is not None}}
    if mt == "gpt2" and (c.get("add_cross_attention") or c.get("scale_attn_by_inverse_layer_idx")
                         or not c.get("scale_attn_weights", True)):
        raise GptlabError(f"{where}: cross-attention and non-standard attention scaling have no gptlab equivalent")
    act, acts = c["activation_function" if mt == "gpt2" else "afn"], _ACT_FROM_HF[mt]
    if act not in acts:
        raise GptlabError(f"{where}: activation {act!r} is not supported for {mt} (gptlab maps {', '.join(acts)})")
    try:
        cfg = GPTConfig(
            vocab_size=int(c["vocab_size"]), block_size=int(c["n_positions"]), n_layer=int(c["n_layer"]),
            n_head=int(c["n_head"]), n_embd=int(c["n_embd"]), d_ff=int(c.get("n_inner") or 4 * int(c["n_embd"])),
            norm="pre" if mt == "gpt2" else "post", activation=acts[act],
            embd_pdrop=float(c.get("embd_pdrop", 0.1)), attn_pdrop=float(c.get("attn_pdrop", 0.1)),
            resid_pdrop=float(c.get("resid_pdrop", 0.1)), ln_eps=float(c.get("layer_norm_epsilon", 1e-5)),
            init_std=float(c.get("initializer_range", 0.02)), scaled_residual_init=mt == "gpt2",
            tie_embeddings=bool(c.get("tie_word_embeddings", True)))
    except (TypeError, ValueError) as e:
        raise GptlabError(f"{where}: bad config value ({_one_line(e)})") from None
    return cfg, mt


def _gptlab_state(sd: dict[str, torch.Tensor], mt: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("transformer.")
        if _BUFFERS.search(k):
            continue
        k = _GPT1_NAMES.get(k, k) if mt == "openai-gpt" else k
        if _CONV1D.fullmatch(k) and v.ndim == 2:
            v = v.t()  # Conv1D (in, out) -> Linear (out, in)
        out[k] = v.float().contiguous() if v.is_floating_point() else v
    return out


def _hf_bpe_files(d: Path) -> tuple[dict[str, int], list[tuple[str, ...]], dict[str, int], str] | None:
    """(vocab, merges, added tokens, source) from vocab.json + merges.txt, or tokenizer.json; None if neither."""
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        vocab = read_json(d / "vocab.json", "HF vocab")
        try:
            lines = (d / "merges.txt").read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise GptlabError(f"{d / 'merges.txt'} is corrupt ({_one_line(e)})") from None
        merges = [tuple(ln.split()) for ln in lines if ln.strip() and not ln.startswith("#version")]
        tc = read_json(d / "tokenizer_config.json", "HF tokenizer config") if (d / "tokenizer_config.json").is_file() else {}
        added = {t["content"]: int(i) for i, t in (tc.get("added_tokens_decoder") or {}).items()}
        return vocab, merges, added, "vocab.json + merges.txt"
    if (d / "tokenizer.json").is_file():
        tj = read_json(d / "tokenizer.json", "HF tokenizer")
        m, pre = tj.get("model") or {}, tj.get("pre_tokenizer") or {}
        if (m.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True)
                or pre.get("add_prefix_space") or tj.get("normalizer") or m.get("continuing_subword_prefix")
                or m.get("end_of_word_suffix")):
            raise GptlabError(f"{d / 'tokenizer.json'} is not a GPT-2 style byte-level BPE; pass --tokenizer gpt2 or PATH")
        merges = [tuple(x.split()) if isinstance(x, str) else tuple(x) for x in m.get("merges", [])]
        added = {t["content"]: int(t["id"]) for t in tj.get("added_tokens", [])}
        return m.get("vocab") or {}, merges, added, "tokenizer.json"
    return None


def bpe_from_hf(vocab: dict[str, int], merges: list[tuple[str, ...]], added: dict[str, int], where: str) -> BPETokenizer:
    """GPT-2 format -> tiktoken ranks (= HF ids). tiktoken merges by the rank of the merged token, so the
    merged ids must increase in merge order. (tiktoken's data_gym loader assumes GPT-2's own single-byte
    order and caches files by path; this reads any byte-level BPE, e.g. a gptlab-trained one exported.)"""
    def to_bytes(s: str) -> bytes:
        try:
            return bytes(CHAR_TO_BYTE[ch] for ch in s)
        except KeyError:
            raise GptlabError(f"{where}: token {s!r} is not byte-level BPE (GPT-2 format)") from None

    try:
        ranks = {bytes([b]): vocab[ch] for b, ch in BYTE_TO_CHAR.items()}
    except KeyError as e:
        raise GptlabError(f"{where}: vocabulary lacks the single-byte token {e.args[0]!r}") from None
    mergeable, prev = set(BYTE_TO_CHAR.values()), -1
    for i, pair in enumerate(merges):
        if len(pair) != 2 or "".join(pair) not in vocab:
            raise GptlabError(f"{where}: merge {i} {' '.join(pair)!r} is malformed or its token is not in the vocabulary")
        s = "".join(pair)
        tok, rank = to_bytes(s), vocab[s]
        if tok in ranks or rank <= prev:
            raise GptlabError(f"{where}: merge {i} ({s!r}, id {rank}) repeats a token or is out of id order; "
                              "tiktoken needs merged ids increasing in merge order")
        ranks[tok], prev = rank, rank
        mergeable.add(s)
    # tiktoken merges any adjacent pair whose bytes form a token; HF merges only listed pairs. They agree
    # exactly when each merge is the split that rank-limited BPE makes of its token: check every one.
    for i, (a, b) in enumerate(merges):
        tok = to_bytes(a + b)
        if _rank_limited_bpe(ranks, tok, ranks[tok]) != [to_bytes(a), to_bytes(b)]:
            raise GptlabError(f"{where}: merge {i} {a!r} {b!r} is not the pair byte-level BPE would merge first; "
                              "tiktoken would tokenize differently from this tokenizer")
    special = {s: int(i) for s, i in {**vocab, **added}.items() if s not in mergeable}
    if EOT not in special:
        raise GptlabError(f"{where}: tokenizer has no {EOT} token")
    try:
        return BPETokenizer(ranks, GPT2_PATTERN, special, name="hf-bpe")
    except GptlabError as e:
        raise GptlabError(f"{where}: {e}") from None


def _import_tokenizer(d: Path, mt: str, spec: str | None) -> tuple[Tokenizer, str]:
    if spec is not None:
        if spec != "gpt2" and not Path(spec).exists():
            raise GptlabError(f"--tokenizer must be 'gpt2' or a saved gptlab tokenizer (file or its dir), got {spec!r}")
        return build_tokenizer(spec), spec
    try:
        files = _hf_bpe_files(d) if mt == "gpt2" else None
        if files is None:
            why = ("GPT-1's own BPE (lower-cased, </w> word ends) is not byte-level and cannot be imported"
                   if mt == "openai-gpt" else "it has no vocab.json + merges.txt or tokenizer.json")
            raise GptlabError(f"{d}: no usable tokenizer ({why}); pass --tokenizer gpt2 or --tokenizer PATH")
        vocab, merges, added, src = files
        return bpe_from_hf(vocab, merges, added, str(d)), src
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # JSON of the wrong shape
        raise GptlabError(f"{d}: malformed HF tokenizer files ({_one_line(e)})") from None


def import_hf(hf_dir, out_run_dir, tokenizer: str | None = None) -> Path:
    """HF GPT-2 / GPT-1 checkpoint dir -> gptlab run dir (stage 'import'). Returns the run dir."""
    d, out = Path(hf_dir), Path(out_run_dir)
    if not d.is_dir():
        raise GptlabError(f"HF checkpoint directory not found: {d}")
    _check_out(out)  # fail before the slow part
    cfg, mt = _config_from_hf(read_json(d / "config.json", "HF config"), d / "config.json")
    tok, tok_src = _import_tokenizer(d, mt, tokenizer)
    check_vocab(cfg, tok, str(d))  # before the (possibly large) weights are read
    hf_sd, weights = _load_hf_weights(d)

    sd = _gptlab_state(hf_sd, mt)
    del hf_sd  # frees the Conv1D originals of the transposed weights
    head, wte = sd.pop("lm_head.weight", None), sd.get("wte.weight")
    if head is None and not cfg.tie_embeddings:
        raise GptlabError(f"{d / weights}: lm_head.weight is missing but the config unties it (tie_word_embeddings false)")
    # HF drops a tied head from safetensors but keeps it in .bin files; only a different head is untied
    cfg.tie_embeddings = head is None or (wte is not None and head.shape == wte.shape and torch.equal(head, wte))
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = head
    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    load_state_into(model, sd, d / weights)  # names and shapes checked: one-line errors
    source = {"format": "huggingface", "model_type": mt, "path": str(d.resolve()), "weights": weights,
              "tokenizer": tok_src}
    template = read_hf_template(d)  # the model's chat template: `gptlab serve` chats with it
    if template is not None:
        source["chat_template"] = TEMPLATE_FILE
    with _staged_dir(out) as tmp:
        write_run_config(tmp, cfg, tok, stage="import", source=source)
        save_model(model, tmp / MODEL_FILE)
        if template is not None:
            (tmp / TEMPLATE_FILE).write_text(template, encoding="utf-8")
    return out


# --- export ------------------------------------------------------------------------------------------
def _rank_limited_bpe(ranks: dict[bytes, int], tok: bytes, max_rank: int) -> list[bytes]:
    """Byte-pair merge `tok` using only merges of rank < max_rank (lowest rank first, as tiktoken does)."""
    parts = [tok[i:i + 1] for i in range(len(tok))]
    while True:
        best, at = max_rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best:
                best, at = r, i
        if at < 0:
            return parts
        parts[at:at + 2] = [parts[at] + parts[at + 1]]


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list that reproduces `ranks`: the merge creating the token of rank r is the split that BPE
    with ranks < r leaves it in, which must be exactly two parts."""
    merges = []
    for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            parts = _rank_limited_bpe(ranks, tok, r)
            if len(parts) != 2:
                raise GptlabError(f"BPE token {tok!r} (rank {r}) is not one merge of lower-ranked tokens; "
                                  "its ranks are not in merge order")
            merges.append((parts[0], parts[1]))
    return merges


def _check_exportable(cfg: GPTConfig) -> str:
    """-> HF model_type, or a one-line refusal naming what has no HF equivalent."""
    if cfg.head:
        raise GptlabError(f"cannot export: this run has a fine-tuned {cfg.head} head, which GPT2LMHeadModel has no "
                          "place for; export the pretrained run it started from")
    if cfg.n_head * cfg.head_dim != cfg.n_embd:
        raise GptlabError(f"cannot export: attention width n_head·head_dim = {cfg.n_head * cfg.head_dim} ≠ n_embd "
                          f"{cfg.n_embd} (HF GPT-2/GPT-1 derive head_dim from n_embd)")
    sparse = sorted({cfg.layer_attention(i) for i in range(cfg.n_layer)} - {"dense"})
    if sparse:
        raise GptlabError(f"cannot export: {', '.join(sparse)} attention layers have no HF GPT-2 equivalent (dense only)")
    if not cfg.bias:
        raise GptlabError("cannot export: a model without biases (bias=False) has no HF GPT-2/GPT-1 equivalent")
    if cfg.norm == "post" and cfg.activation != "gelu_tanh":
        raise GptlabError("cannot export: HF GPT-1 (OpenAIGPT) computes GELU with the tanh approximation; this post-LN "
                          "model uses the exact erf GELU (activation 'gelu'), which no HF GPT-1 config reproduces")
    if cfg.norm == "post" and cfg.d_ff != 4 * cfg.n_embd:
        raise GptlabError(f"cannot export: HF GPT-1 fixes the FFN width at 4·n_embd = {4 * cfg.n_embd}, this model has {cfg.d_ff}")
    return "gpt2" if cfg.norm == "pre" else "openai-gpt"


def _hf_config(cfg: GPTConfig, mt: str, eot: int, dtype: torch.dtype) -> dict:
    common = dict(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                  n_head=cfg.n_head, resid_pdrop=cfg.resid_pdrop, embd_pdrop=cfg.embd_pdrop, attn_pdrop=cfg.attn_pdrop,
                  layer_norm_epsilon=cfg.ln_eps, initializer_range=cfg.init_std, bos_token_id=eot, eos_token_id=eot,
                  tie_word_embeddings=cfg.tie_embeddings, dtype=str(dtype).removeprefix("torch."))
    if mt == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common, "n_inner": cfg.d_ff,
                "activation_function": _ACT_TO_HF[mt][cfg.activation], "scale_attn_weights": True, "use_cache": True}
    return {"architectures": ["OpenAIGPTLMHeadModel"], "model_type": "openai-gpt", **common,
            "afn": _ACT_TO_HF[mt][cfg.activation]}


def _hf_state(model: GPT, mt: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in model_state(model).items():  # a tied lm_head is already left out
        if k == "lm_head.weight":
            out[k] = v.contiguous()
            continue
        if _CONV1D.fullmatch(k):
            v = v.t()  # Linear (out, in) -> Conv1D (in, out)
        if mt == "openai-gpt":
            k = _GPT1_TO_HF.get(k, k)
        out["transformer." + k] = v.contiguous()
    return out


def _tokenizer_files(tok: Tokenizer, block_size: int) -> dict[str, dict | str]:
    if not isinstance(tok, BPETokenizer):
        raise GptlabError(f"cannot export a {tok.kind} tokenizer: HF GPT-2 tokenizers are byte-level BPE "
                          "(train one with `gptlab tokenizer train --kind bpe`, or use gpt2)")
    if tok.pattern != GPT2_PATTERN:
        raise GptlabError("cannot export: the BPE uses a split pattern other than GPT-2's, which GPT2Tokenizer hard-codes")
    ranks, special = tok.mergeable_ranks, tok.special_tokens
    as_text = lambda b: "".join(BYTE_TO_CHAR[x] for x in b)  # noqa: E731
    vocab = {as_text(t): r for t, r in sorted(ranks.items(), key=lambda kv: kv[1])} | special
    merges = "#version: 0.2\n" + "".join(f"{as_text(a)} {as_text(b)}\n" for a, b in bpe_merges(ranks))
    added = {str(i): dict(content=s, lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
             for s, i in sorted(special.items(), key=lambda kv: kv[1])}
    others = [s for s in sorted(special, key=special.get) if s != EOT]
    smap = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT, **({"additional_special_tokens": others} if others else {})}
    # clean_up_tokenization_spaces False: decode must give back the exact text, as gptlab's decode does
    tcfg = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size, "add_prefix_space": False,
            "add_bos_token": False, "errors": "replace", "clean_up_tokenization_spaces": False, "pad_token": None,
            **smap, "added_tokens_decoder": added}
    from gptlab.chat.template import CHAT_TOKENS, JINJA_TEMPLATE

    if all(t in special for t in CHAT_TOKENS):  # the one chat template, for tokenizer.apply_chat_template
        tcfg["chat_template"] = JINJA_TEMPLATE
    return {"vocab.json": vocab, "merges.txt": merges, "tokenizer_config.json": tcfg, "special_tokens_map.json": smap}


def export_hf(run_dir, out_dir) -> Path:
    """gptlab run dir -> HF dir loadable by GPT2LMHeadModel / OpenAIGPTLMHeadModel and AutoTokenizer."""
    out = Path(out_dir)
    _check_out(out)
    run = load_run(run_dir)
    if (run.config.get("compression") or {}).get("modules"):  # int8/4-bit layers have no GPT-2 Conv1D weights
        raise GptlabError(f"{run_dir} is quantized (gptlab compress); export the dense or pruned run it came from")
    cfg, tok = run.model.cfg, run.tokenizer
    mt = _check_exportable(cfg)
    files = _tokenizer_files(tok, cfg.block_size)  # refuses before anything is written
    own = Path(run_dir) / TEMPLATE_FILE  # a template the run came with (an import) goes back out with it
    if own.is_file():
        files["tokenizer_config.json"]["chat_template"] = own.read_text(encoding="utf-8")
    eot = tok.eot_id
    files["config.json"] = _hf_config(cfg, mt, eot, run.model.wte.weight.dtype)
    files["generation_config.json"] = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot,
                                       "max_length": cfg.block_size}
    with _staged_dir(out) as tmp:
        save_tensors(_hf_state(run.model, mt), tmp / "model.safetensors", metadata={"format": "pt"})
        for name, content in files.items():
            text = content if isinstance(content, str) else json.dumps(content, indent=2, ensure_ascii=False) + "\n"
            (tmp / name).write_text(text, encoding="utf-8")
    return out
