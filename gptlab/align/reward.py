"""InstructGPT step 2: the reward model (`gptlab reward train`, `gptlab reward score`).

Model: the SFT trunk with a scalar head (`add_head("scalar", 1)`; the LM head is kept in the weights but
unused). A (prompt, response) pair is scored as

    render_ids(prompt, add_generation_prompt=True) + encode(response) + [<|end|>]

and the reward is the head over the final hidden state AT the `<|end|>` closing the response: sequences are
right-padded and the state is gathered at each row's explicit end index, so a pad position is never read.
That is also the token a policy's rollout stops on, so PPO scores its samples at the same place.

Training: each prompt with its K ranked responses is one batch element; all C(K,2) comparisons go through
`kwise_ranking_loss` (InstructGPT eq. 1) and every prompt is seen once per epoch. Held-out pairwise accuracy
is logged at each eval (metrics.jsonl, accuracy.png). Afterwards the offset = mean raw reward of a reference
set of SFT-style responses (the best-ranked held-out responses, or `reference=`) is saved in config.json as
"reward": {"offset", "read_at"}, and `RewardModel` subtracts it, so that reference set scores 0 on average.

Too long: the response keeps its start (at most max(T/2, T − prompt) tokens) and the prompt keeps its end.
Dropout is off by default (scores must be deterministic for the ranking loss and for PPO).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import NamedTuple

import torch

from gptlab.align.data import Preference, load_preferences, load_sft_examples
from gptlab.align.losses import kwise_ranking_loss, ranking_accuracy
from gptlab.chat.template import END, add_chat_tokens, render_ids
from gptlab.stage.lora import attach, resolve_lora, resume_token_ids
from gptlab.errors import GptlabError
from gptlab.stage import (NO_DROPOUT, EpochOrder, begin, eval_subsets, fit, load_pretrained, resolve_train, schedule,
                          single_process, split_heldout, unwrap)
from gptlab.model import GPT, GPTConfig
from gptlab.run import check_vocab, load_run, read_run_config
from gptlab.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer
from gptlab.train import distributed as D
from gptlab.fileio import atomic_write_json
from gptlab.plot import Line, Panel, plot
from gptlab.train.metrics import read_metrics
from gptlab.run.format import CONFIG_FILE, METRICS_FILE
from gptlab.run.lock import writes_run_dir

RECIPE = "reward"
# InstructGPT trained its RMs for 1 epoch (more overfits), cosine decay, batch 64 prompts; lr suited to small models
RM_RECIPE: dict = dict(lr=5e-5, batch_size=8, schedule="cosine", min_lr_ratio=0.1, warmup_tokens=0, decay_tokens=0,
                       weight_decay=0.0, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0, batch_warmup_tokens=0,
                       grad_accum=1, eval_interval=50, eval_iters=8, log_interval=10, checkpoint_interval=500)
WARMUP_FRACTION = 0.03
READ_AT = END


# --- encoding ------------------------------------------------------------------------------------
def prompt_ids(tok: Tokenizer, prompt: list[dict]) -> list[int]:
    return render_ids(tok, prompt, add_generation_prompt=True)[0]


class Encoded(NamedTuple):
    ids: list[int]    # prompt (end kept) + response (start kept) + <|end|>
    start: int        # index of the first response token (= end when the response is empty)
    end: int          # index of the closing <|end|>: the last token
    truncated: bool


def encode_response(tok: Tokenizer, p_ids: list[int], response: str, T: int) -> Encoded:
    """prompt ids (with the generation prompt) + response + <|end|> in at most T tokens."""
    end_id = tok.special_tokens[END]
    resp = tok.encode(response)
    cap = max(T // 2, T - len(p_ids)) - 1
    truncated = len(resp) > cap
    resp = resp[:cap] + [end_id]
    room = T - len(resp)
    truncated |= len(p_ids) > room
    ids = (p_ids[-room:] if room > 0 else []) + resp
    return Encoded(ids, len(ids) - len(resp), len(ids) - 1, truncated)


class Scored(NamedTuple):
    seqs: list[list[int]]   # K sequences, best first
    truncated: int


def encode_preferences(tok: Tokenizer, prefs: list[Preference], T: int) -> tuple[list[Scored], int]:
    out, n_trunc = [], 0
    for p in prefs:
        pid = prompt_ids(tok, p.prompt)
        enc = [encode_response(tok, pid, r, T) for r in p.responses]
        tr = sum(e.truncated for e in enc)
        n_trunc += tr > 0
        out.append(Scored([e.ids for e in enc], tr))
    return out, n_trunc


class RMBatch(NamedTuple):
    x: torch.Tensor       # (M, T) the M = Σ K_n sequences, right-padded
    end: torch.Tensor     # (M,) index of each sequence's <|end|> (its last real token)
    slot: torch.Tensor    # (M,) flat index n·K + k of each sequence in the (N, K) reward table
    valid: torch.Tensor   # (N, K) real responses


def collate(items: list[list[list[int]]], pad: int, device=None) -> RMBatch:
    """items[n] = the K_n sequences of prompt n (best first) -> one right-padded batch."""
    flat = [s for seqs in items for s in seqs]
    K = max(len(seqs) for seqs in items)
    T = max(len(s) for s in flat)
    x = torch.tensor([s + [pad] * (T - len(s)) for s in flat], dtype=torch.long)
    end = torch.tensor([len(s) - 1 for s in flat], dtype=torch.long)
    slot = torch.tensor([n * K + k for n, seqs in enumerate(items) for k in range(len(seqs))], dtype=torch.long)
    valid = torch.zeros(len(items), K, dtype=torch.bool)
    for n, seqs in enumerate(items):
        valid[n, :len(seqs)] = True
    return RMBatch(x.to(device), end.to(device), slot.to(device), valid.to(device))


# --- scoring -------------------------------------------------------------------------------------
def _hidden(model: GPT, idx: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    """(B, T) -> (B, T, C). With `pad` (B,) left-padding counts, rows are run through a KV cache that gives
    each row its own positions and hides its padding (the layout of the generator's batches)."""
    if pad is None or not bool(pad.any()):
        return model.hidden(idx)
    from gptlab.generate.cache import KVCache

    dtype = torch.get_autocast_dtype(idx.device.type) if torch.is_autocast_enabled(idx.device.type) else model.wte.weight.dtype
    cache = KVCache(model.cfg, idx.size(0), idx.size(1), idx.device, dtype, pad=pad)
    return model.hidden(idx, cache=cache)


def token_scores(model: torch.nn.Module, idx: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
    """Raw scalar head over every position's final hidden state: (B, T) ids -> (B, T) fp32 (the PPO critic's
    per-token values). `pad` (B,): left-padding counts, for left-padded rows."""
    raw = unwrap(model)
    return raw.head_logits(_hidden(raw, idx, pad)).squeeze(-1).float()


def raw_rewards(model: torch.nn.Module, idx: torch.Tensor, end: torch.Tensor,
                pad: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) ids, (B,) index of each row's <|end|> -> (B,) raw rewards read at exactly those positions."""
    raw = unwrap(model)
    h = _hidden(raw, idx, pad)  # (B, T, C)
    h_end = h[torch.arange(idx.size(0), device=idx.device), end]  # (B, C): never a pad, whatever the padding
    return raw.head_logits(h_end).squeeze(-1).float()


def batch_rewards(model: torch.nn.Module, b: RMBatch) -> torch.Tensor:
    """-> (N, K) reward table (0 where not valid)."""
    r = raw_rewards(model, b.x, b.end)
    table = r.new_zeros(b.valid.numel())
    return table.index_put((b.slot,), r).view(b.valid.shape)


def rm_loss(model: torch.nn.Module, b: RMBatch) -> torch.Tensor:
    return kwise_ranking_loss(batch_rewards(model, b), b.valid)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches) -> tuple[float, float]:
    """-> (mean ranking loss over prompts, pairwise accuracy over all pairs)."""
    loss_sum, n, right, pairs = 0.0, 0, 0.0, 0
    for b in batches:
        r = batch_rewards(model, b)
        k = b.valid.sum(1)
        n_pairs = int((k * (k - 1) // 2).sum())
        loss_sum += kwise_ranking_loss(r, b.valid).item() * int((k > 1).sum())
        n += int((k > 1).sum())
        right += ranking_accuracy(r, b.valid).item() * n_pairs
        pairs += n_pairs
    return loss_sum / max(n, 1), right / max(pairs, 1)


def plot_accuracy(metrics_path: Path, out_png: Path) -> Path | None:
    line = Line.of(read_metrics(metrics_path), "heldout_accuracy", "held-out pairwise accuracy", "o-")
    return plot(out_png, [Panel([line], ylabel="accuracy", ylim=(0, 1), hlines=[(0.5, "chance")])],
                f"reward model · {Path(metrics_path).parent.name}")


# --- the RewardModel API ---------------------------------------------------------------------------
class RewardModel:
    """A trained reward model: rewards normalised by the saved offset (reference responses average 0)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, offset: float = 0.0, config: dict | None = None,
                 path: Path | None = None):
        if model.cfg.head != "scalar" or model.cfg.head_out != 1:
            raise GptlabError(f"{path or 'model'} is not a reward model (it has no scalar head)")
        self.model, self.tokenizer, self.offset = model, tokenizer, float(offset)
        self.config, self.path = config or {}, path
        self.end_id = tokenizer.special_tokens[END]

    @classmethod
    def load(cls, run_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> "RewardModel":
        run = load_run(Path(run_dir), device=device, dtype=dtype)
        info = run.config.get("reward")
        if run.config.get("stage") != "reward" or not info:
            raise GptlabError(f"{run_dir} is not a reward-model run (train one with `gptlab reward train`)")
        return cls(run.model, run.tokenizer, info.get("offset", 0.0), run.config, run.path)

    @property
    def device(self) -> torch.device:
        return self.model.wte.weight.device

    @torch.no_grad()
    def score_ids(self, idx: torch.Tensor, end_index: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids, (B,) index of each row's closing <|end|> -> (B,) normalised rewards (fp32)."""
        self.model.eval()
        return raw_rewards(self.model, idx.to(self.device), end_index.to(self.device),
                           None if pad is None else pad.to(self.device)) - self.offset

    @torch.no_grad()
    def score(self, prompts: list[list[dict]], responses: list[str], batch_size: int = 16) -> list[float]:
        """Normalised reward of each (prompt conversation, response text)."""
        if len(prompts) != len(responses):
            raise GptlabError(f"{len(prompts)} prompts but {len(responses)} responses")
        if batch_size < 1:
            raise GptlabError(f"batch size must be ≥ 1, got {batch_size}")
        T = self.model.cfg.block_size
        seqs = [encode_response(self.tokenizer, prompt_ids(self.tokenizer, p), r, T).ids for p, r in zip(prompts, responses)]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # little padding per batch
        out = [0.0] * len(seqs)
        pad = self.tokenizer.eot_id
        for k in range(0, len(order), batch_size):
            chunk = order[k:k + batch_size]
            L = max(len(seqs[i]) for i in chunk)
            x = torch.tensor([seqs[i] + [pad] * (L - len(seqs[i])) for i in chunk], dtype=torch.long)
            end = torch.tensor([len(seqs[i]) - 1 for i in chunk], dtype=torch.long)
            for i, v in zip(chunk, self.score_ids(x, end).tolist()):
                out[i] = v
        return out

    def score_preferences(self, prefs: list[Preference], batch_size: int = 16) -> tuple[list[list[float]], float, int]:
        """Scores of each preference row's responses (best first) -> (scores per row, pairwise accuracy
        against the rows' rankings with a tie counted half, as in training, number of pairs)."""
        flat = [(i, p.prompt, r) for i, p in enumerate(prefs) for r in p.responses]
        per: list[list[float]] = [[] for _ in prefs]
        for (i, _, _), s in zip(flat, self.score([f[1] for f in flat], [f[2] for f in flat], batch_size)):
            per[i].append(s)
        K = max((len(s) for s in per), default=0)
        rewards = torch.tensor([s + [0.0] * (K - len(s)) for s in per]) if per else torch.zeros(0, 0)
        valid = torch.tensor([[j < len(s) for j in range(K)] for s in per], dtype=torch.bool) if per else rewards.bool()
        pairs = sum(len(s) * (len(s) - 1) // 2 for s in per)
        return per, ranking_accuracy(rewards, valid).item() if pairs else float("nan"), pairs


# --- training --------------------------------------------------------------------------------------
def _reference_pairs(reference, heldout: list[Preference], train: list[Preference]):
    """-> (prompts, responses) the offset is computed on, and a description."""
    if reference is not None:
        convs = load_sft_examples(reference, skip_empty=True)
        return [c[:-1] for c in convs], [c[-1]["content"] for c in convs], f"{len(convs)} reference responses"
    src, what = (heldout, "held-out") if heldout else (train, "training")
    return [p.prompt for p in src], [p.responses[0] for p in src], f"the best-ranked {what} responses ({len(src)})"


@writes_run_dir()
def train_reward(out_dir: str | Path, data, *, init_from: str | Path | None = None, epochs: float = 1.0,
                 heldout_fraction: float = 0.1, train: dict | None = None, resume: bool = False, reference=None,
                 dropout: bool = False, quiet: bool = False, lora: dict | None = None) -> dict:
    """Train a reward model into `out_dir` from the SFT run `init_from` on preference `data` -> final metrics
    ("heldout_accuracy", "train_accuracy", "offset", "val_loss", "step", ...)."""
    st = begin(out_dir, "reward", resume)
    out, init_from, section = st.out, st.init_from(init_from), "reward_train"
    if init_from is None and not resume:
        raise GptlabError("reward training needs --from RUN_DIR (the SFT run whose trunk it starts from)")
    data = st.data(data, "a preference file", section)
    epochs, heldout_fraction = st.kept("epochs", epochs, section), st.kept("heldout_fraction", heldout_fraction, section)
    cfg, given = resolve_train(RECIPE, RM_RECIPE, *st.train_layers(train or {}, section=section))
    prefs = load_preferences(data, quiet=quiet)
    train_idx, held_idx = split_heldout(len(prefs), heldout_fraction, cfg.seed)
    train_p, held_p = [prefs[i] for i in train_idx], [prefs[i] for i in held_idx]

    lcfg = resolve_lora(st, lora)
    torch.manual_seed(cfg.seed)  # the head's init
    new_tokens = resume_token_ids(st)
    if resume:
        tok = load_tokenizer(out / st.saved.get("tokenizer", TOKENIZER_FILE))
        model = GPT(GPTConfig.from_dict(st.saved["model"]))
    else:
        model, tok = load_pretrained(init_from, {} if dropout else NO_DROPOUT)
        tok, new_tokens = add_chat_tokens(tok, model)
        model.add_head("scalar", 1, head_pdrop=model.cfg.head_pdrop if dropout else 0.0)
    check_vocab(model.cfg, tok, "reward")
    lora_section = attach(model, lcfg, new_tokens, quiet=quiet or resume)
    T = min(cfg.block_size or model.cfg.block_size, model.cfg.block_size)
    cfg.block_size = T
    train_s, n_trunc = encode_preferences(tok, train_p, T)
    held_s, h_trunc = encode_preferences(tok, held_p, T)
    info, device = D.init_distributed(cfg.device)
    single_process(info, "reward")
    cfg = schedule(cfg, given, len(train_s), epochs, WARMUP_FRACTION)
    model = model.to(device)
    stage_cfg = {"data": str(Path(data).resolve()) if isinstance(data, (str, Path)) else None, "epochs": epochs,
                 "heldout_fraction": heldout_fraction, "n_train": len(train_s), "n_heldout": len(held_s),
                 "n_truncated": n_trunc + h_trunc, "max_iters_given": "max_iters" in given}
    init_cfg = st.saved.get("init") if resume else {"from": str(Path(init_from).resolve()), "weights": "sft"}
    st.record(model.cfg, tok, stage="reward", train=cfg.to_dict(), reward_train=stage_cfg, init=init_cfg,
              **({"lora": lora_section} if lora_section else {}))
    if not quiet:
        ks = sorted({len(p.responses) for p in prefs})
        print(f"reward model: {model.num_params() / 1e6:.2f}M parameters · scalar head read at {READ_AT} · context {T}")
        print(f"data: {len(train_s):,} train / {len(held_s):,} held-out prompts · K = {ks} ranked responses · "
              f"{n_trunc + h_trunc} prompts with a truncated sequence")
        print(f"train: batch {cfg.batch_size} prompts · lr {cfg.lr:g} {cfg.schedule} · {cfg.max_iters} steps "
              f"({epochs:g} epochs) · {cfg.dtype} on {device}")

    pad = tok.eot_id
    order = EpochOrder(len(train_s), cfg.seed)

    def batch_fn(step: int, sl: slice, n_global: int) -> RMBatch:
        return collate([train_s[i].seqs for i in order.indices(step, sl, n_global)], pad, device)

    def batches(items: list[Scored], idx: list[int]):
        idx = sorted(idx, key=lambda i: max(len(s) for s in items[i].seqs))
        for k in range(0, len(idx), cfg.batch_size):
            yield collate([items[i].seqs for i in idx[k:k + cfg.batch_size]], pad, device)

    subset, train_subset = eval_subsets(cfg.seed, (len(held_s), cfg.eval_iters * cfg.batch_size),
                                        (len(train_s), 200))  # train accuracy on a sample: cheap

    def eval_fn(m: torch.nn.Module, final: bool) -> dict:
        out_: dict = {}
        if held_s:
            loss, acc = evaluate(m, batches(held_s, list(range(len(held_s))) if final else subset))
            out_.update(val_loss=loss, heldout_accuracy=acc)
        if final:
            out_["train_accuracy"] = evaluate(m, batches(train_s, train_subset))[1]
        return out_

    tokens_per_sample = max(1, round(sum(len(s) for it in train_s for s in it.seqs) / len(train_s)))
    result = fit(model, cfg, st, batch_fn, info=info, tokens_per_sample=tokens_per_sample, loss_fn=rm_loss,
                 eval_fn=eval_fn, device=device)
    plot_accuracy(out / METRICS_FILE, out / "accuracy.png")

    # normalise: the reference responses' mean raw reward becomes the offset
    ref_prompts, ref_resp, ref_what = _reference_pairs(reference, held_p, train_p)
    rm = RewardModel(model.eval(), tok, 0.0)
    raw = rm.score(ref_prompts, ref_resp, batch_size=cfg.batch_size)  # fp32, as RewardModel.load scores by default
    offset = sum(raw) / len(raw)
    conf = read_run_config(out)
    conf["reward"] = {"offset": offset, "read_at": READ_AT, "reference": ref_what,
                      "heldout_accuracy": result.get("heldout_accuracy"), "train_accuracy": result.get("train_accuracy")}
    atomic_write_json(out / CONFIG_FILE, conf)
    result["offset"] = offset
    result.setdefault("heldout_accuracy", float("nan"))
    if not quiet:
        print(f"done: step {result['step']} · held-out pairwise accuracy {result['heldout_accuracy']:.4f} · "
              f"train accuracy {result['train_accuracy']:.4f} · offset {offset:+.4f} (mean raw reward of {ref_what})"
              f" · run dir {out}")
    if not math.isfinite(offset):
        print("warning: the reward offset is not finite", file=sys.stderr)
    return result
