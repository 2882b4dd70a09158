"""The GPT-1 fine-tuning stage (paper §3.2): a pretrained run dir (or a random init, for the ablation) +
labelled task data -> a run dir whose model carries a task head and the task's special tokens.

Objective L3(C) = L2(C) + λ·L1(C): the task's cross-entropy plus λ times the language-modelling loss on
the same inputs (every non-pad token predicts the next; λ = 0.5 in the paper, 0 turns it off). Both come
out of ONE trunk pass that still goes through `model(x, targets)` (so DDP, FSDP and torch.compile see an
ordinary forward): the LM loss is the model's fused linear + cross-entropy, and the hidden states it was
computed from are kept by a forward hook on the final LayerNorm (`HiddenTap`) for the head.

Training runs on the one engine (`gptlab.train.engine.Trainer`): checkpoints, bit-exact resume, bf16,
DDP. Step s's global batch is examples [s·n, (s+1)·n) of an endless stream of epochs, each epoch a
permutation seeded by (seed, epoch): a pure function of (seed, step), as the engine requires.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from gptlab.errors import GptlabError
from gptlab.finetune.data import (Example, Fields, check_task, label_ids, label_names, load_examples, split_dev)
from gptlab.finetune.tasks import TASK_TOKENS, add_task_tokens, encode_examples
from gptlab.model import GPT, GPTConfig
from gptlab.run import check_vocab
from gptlab.stage import EpochOrder, Start, begin, eval_subsets, fit, load_pretrained, resolve_train, schedule
from gptlab.stage.lora import attach, resolve_lora, resume_token_ids
from gptlab.stage.models import random_model
from gptlab.tokenizer import TOKENIZER_FILE, Tokenizer, build_tokenizer, load_tokenizer
from gptlab.train import distributed as D
from gptlab.train.config import TrainConfig
from gptlab.run.lock import writes_run_dir

RECIPE = "gpt1-finetune"
# GPT-1 §4.1 (fine-tuning details): lr 6.25e-5, batch 32, 3 epochs, linear decay with warmup over 0.2% of
# training, λ = 0.5, classifier dropout 0.1; Adam β2 0.999 and decoupled weight decay 0.01 as in
# pretraining; gradient-norm clip 1 as in the paper's released fine-tuning code.
FINETUNE_RECIPE: dict = dict(lr=6.25e-5, batch_size=32, schedule="linear", min_lr_ratio=0.0, warmup_tokens=0,
                             decay_tokens=0, weight_decay=0.01, beta1=0.9, beta2=0.999, eps=1e-8, grad_clip=1.0,
                             batch_warmup_tokens=0, grad_accum=1)
EPOCHS, WARMUP_FRACTION, LM_COEF = 3.0, 0.002, 0.5
HEAD_OF_TASK = {"classification": "classifier", "entailment": "classifier", "similarity": "classifier",
                "multiple_choice": "scalar"}


# --- batches -------------------------------------------------------------------------------------
class Batch(NamedTuple):
    x: torch.Tensor        # (M, T) token ids of all M sequences, right-padded
    targets: torch.Tensor  # (M, T) next-token targets, -100 on pads and after each extract token
    extract: torch.Tensor  # (M,) position of each sequence's extract token (its last)
    counts: torch.Tensor   # (N,) sequences per example (CPU): 1, 2 (similarity) or the number of choices
    labels: torch.Tensor | None  # (N,) class ids or right-choice indices
    lm_weight: float = 1.0  # this micro-batch's LM tokens ÷ the mean per micro-batch of the step (see batch_fn)


def collate(seqs: list[list[list[int]]], labels: list[int] | None, pad_id: int, device=None,
            pad_multiple: int = 1, max_len: int | None = None) -> Batch:
    """Examples' sequences -> one right-padded batch, padded to this batch's longest sequence (rounded up to
    a multiple of pad_multiple, at most max_len: fewer distinct shapes for torch.compile)."""
    flat = [s for ex in seqs for s in ex]
    T = max(len(s) for s in flat)
    T = max(T, min(-(-T // pad_multiple) * pad_multiple, max_len or T))
    x = torch.tensor([s + [pad_id] * (T - len(s)) for s in flat], dtype=torch.long)
    y = torch.tensor([s[1:] + [-100] * (T - len(s) + 1) for s in flat], dtype=torch.long)
    ext = torch.tensor([len(s) - 1 for s in flat], dtype=torch.long)
    counts = torch.tensor([len(ex) for ex in seqs], dtype=torch.long)
    lab = torch.tensor(labels, dtype=torch.long, device=device) if labels is not None else None
    return Batch(x.to(device), y.to(device), ext.to(device), counts, lab)


# --- heads and losses ----------------------------------------------------------------------------
def task_scores(raw: GPT, h: torch.Tensor, extract: torch.Tensor, counts: torch.Tensor, task: str) -> torch.Tensor:
    """Final hidden states (M, T, C) -> per-example logits: (N, classes), or (N, K) choice scores (choices
    beyond an example's count are -inf). Similarity adds its two orderings' extract states before the head."""
    h_ext = h[torch.arange(h.size(0), device=h.device), extract]  # (M, C)
    if task == "similarity":
        h_ext = h_ext.view(-1, 2, h_ext.size(-1)).sum(1)  # (N, C): ordering a|b + ordering b|a
    out = raw.head_logits(h_ext)
    if task != "multiple_choice":
        return out
    flat = out.squeeze(-1)  # (M,) one scalar per choice
    K = int(counts.max())
    if bool((counts == K).all()):
        return flat.view(-1, K)
    mask = (torch.arange(K)[None, :] < counts[:, None]).to(flat.device)
    return flat.new_full(mask.shape, float("-inf")).masked_scatter(mask, flat)


class HiddenTap:
    """Keeps the output of the model's final LayerNorm (the LM head's input) from the latest forward."""

    def __init__(self, raw: GPT):
        self.h = None
        self._handle = raw.ln_f.register_forward_hook(self._keep)

    def _keep(self, module, args, out) -> None:
        self.h = out

    def pop(self) -> torch.Tensor:
        h, self.h = self.h, None
        if h is None:
            raise RuntimeError("no hidden states captured: the model's forward did not run its final LayerNorm")
        return h

    def close(self) -> None:
        self._handle.remove()


class FinetuneLoss:
    """loss_fn for the engine: L3 = L2 (task cross-entropy) + lm_coef · L1 (LM loss on the same tokens)."""

    def __init__(self, raw: GPT, task: str, lm_coef: float):
        if not raw.cfg.head:
            raise GptlabError("fine-tuning needs a model with a task head")
        self.raw, self.task, self.lm_coef = raw, check_task(task), float(lm_coef)
        self.tap = HiddenTap(raw)

    def terms(self, model: torch.nn.Module, batch: Batch, lm_targets: bool = True):
        """-> (L3, L2, L1, logits). `model` is the raw model or its DDP/FSDP/compiled wrapper. Without
        `lm_targets` (training with λ = 0) no token is an LM target, so the LM head costs nothing."""
        targets = batch.targets if lm_targets else torch.full_like(batch.targets, -100)
        _, lm = model(batch.x, targets)
        logits = task_scores(self.raw, self.tap.pop(), batch.extract, batch.counts, self.task)
        task_loss = F.cross_entropy(logits.float(), batch.labels)
        return task_loss + self.lm_coef * batch.lm_weight * lm, task_loss, lm, logits

    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return self.terms(model, batch, lm_targets=self.lm_coef > 0)[0]

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches) -> dict:
        task_sum, lm_sum, correct, n, n_tok = 0.0, 0.0, 0, 0, 0
        for b in batches:
            _, task_loss, lm, logits = self.terms(model, b)
            k, k_tok = b.labels.numel(), int((b.targets != -100).sum())
            task_sum += task_loss.item() * k  # means over examples and over predicted tokens, whatever the batching
            lm_sum += lm.item() * k_tok
            correct += int((logits.argmax(-1) == b.labels).sum())
            n, n_tok = n + k, n_tok + k_tok
        if n == 0:
            return {}
        return {"val_loss": task_sum / n, "val_acc": correct / n, "val_lm_loss": lm_sum / max(n_tok, 1)}

    def close(self) -> None:
        self.tap.close()


# --- models --------------------------------------------------------------------------------------
# --- the stage -----------------------------------------------------------------------------------
def _labels_of(task: str, train: list[Example], saved: list[str] | None) -> list[str] | None:
    if task == "multiple_choice":
        return None
    names = label_names(train)
    if saved is not None:
        extra = sorted(set(names) - set(saved))
        if extra:
            raise GptlabError(f"the data has labels {extra} that the run being resumed was not trained with ({saved})")
        return list(saved)
    if len(names) < 2:
        raise GptlabError(f"the training data has a single label {names}; a classifier needs at least two")
    if task == "similarity" and any("." in n for n in names):
        raise GptlabError(f"similarity labels {names[:4]}… look like real-valued scores (STS-B); the similarity "
                          "task here is a classifier over label classes, so bin the scores first")
    return names


@dataclass
class Plan:
    """What a fine-tune run is, fixed when it starts and read back from config.json on --resume."""
    task: str
    data: str | Path
    dev: str | Path | None
    dev_fraction: float
    fields: Fields | None
    lm_coef: float
    epochs: float
    epochs_given: bool


def _plan(st: Start, data, task, dev, dev_fraction, fields, lm_coef, epochs, init_from, init, preset_name,
          model_overrides) -> Plan:
    if st.resume:
        saved_task, saved_data = st.section("task"), st.section("data")
        if task is not None and task != saved_task.get("type"):
            raise GptlabError(f"{st.out} was fine-tuned for {saved_task.get('type')}; cannot resume it as {task}")
        if dev is not None and str(Path(dev).resolve()) != str(saved_data.get("dev")):
            # a different dev split changes the training set, so the resumed batches would not be the original's
            raise GptlabError(f"{st.out} was fine-tuned with dev {saved_data.get('dev') or f'split off --data'}; "
                              "resume without --dev (or with the same one)")
        if model_overrides:
            raise GptlabError("--model.* options cannot change a run being resumed; they were fixed when it started")
        kept = Fields(**saved_task.get("fields", {}))  # the saved mapping, field by field unless given again
        return Plan(saved_task["type"], data or saved_data.get("train"), saved_data.get("dev"),
                    saved_data.get("dev_fraction", 0.1) if dev_fraction is None else dev_fraction,
                    Fields(**{k: getattr(fields, k, None) or v for k, v in kept.to_dict().items()}),
                    saved_task.get("lm_coef", LM_COEF) if lm_coef is None else lm_coef,
                    saved_task.get("epochs", EPOCHS) if epochs is None else epochs, epochs is not None)
    if init_from is None and init is None:
        raise GptlabError("finetune needs --from RUN_DIR (a pretrained run) or --init random --preset P")
    if init is not None and init != "random":
        raise GptlabError(f"--init must be 'random', got {init!r}")
    if init == "random" and not preset_name and init_from is None:
        raise GptlabError("--init random needs --preset (the architecture to initialise), or --from RUN_DIR "
                          "to take that run's architecture and tokenizer")
    if init_from is not None and preset_name:
        raise GptlabError("--preset goes with --init random alone; with --from the run fixes the architecture")
    return Plan(check_task(task or "classification"), data, dev, 0.1 if dev_fraction is None else dev_fraction,
                fields, LM_COEF if lm_coef is None else lm_coef, EPOCHS if epochs is None else epochs,
                epochs is not None)


def transfer(model: GPT, n_layers: int) -> GPT:
    """Keep the embeddings and blocks [0, n_layers) of `model`; the blocks above start from a fresh init
    (GPT-1 Figure 2, left: accuracy against the number of layers transferred)."""
    if not 0 <= n_layers <= model.cfg.n_layer:
        raise GptlabError(f"--transfer-layers must be in [0, {model.cfg.n_layer}] for this {model.cfg.n_layer}-layer "
                          f"model, got {n_layers}")
    fresh = GPT(model.cfg)
    for i in range(n_layers, model.cfg.n_layer):
        model.h[i].load_state_dict(fresh.h[i].state_dict())
    return model


def _start_model(st: Start, plan: Plan, labels, texts, init_from, init, preset_name, tokenizer, model_overrides,
                 quiet, transfer_layers: int | None = None) -> tuple[GPT, Tokenizer, str, list[int]]:
    """The model (with the task tokens and head), tokenizer, origin and the token ids it added: resumed,
    pretrained, or a random init."""
    if st.resume:
        tok = load_tokenizer(st.out / st.saved.get("tokenizer", TOKENIZER_FILE))
        return GPT(GPTConfig.from_dict(st.saved["model"])), tok, f"resumed {st.out}", resume_token_ids(st)
    if init_from is not None:
        model, tok = load_pretrained(init_from, model_overrides)
        origin = f"pretrained run {init_from}"
        if init == "random":  # same architecture and tokenizer, fresh weights
            model, origin = GPT(model.cfg), f"random init with the architecture and tokenizer of {init_from}"
        elif transfer_layers is not None:
            model = transfer(model, transfer_layers)
            origin += f" (embeddings and {transfer_layers} of {model.cfg.n_layer} blocks transferred)"
    else:  # char / bpe:N are built from train + dev texts (no labels), so a char vocabulary covers dev too
        tok = build_tokenizer(tokenizer, texts(), progress=not quiet)
        model, origin = random_model(preset_name, tok, model_overrides), f"random init, preset {preset_name}, tokenizer {tokenizer}"
    tok, new_ids = add_task_tokens(tok, model)
    model.add_head(HEAD_OF_TASK[plan.task], len(labels) if labels else 1, model.cfg.head_pdrop)
    return model, tok, origin, new_ids


def _report(model, origin, plan: Plan, cfg: TrainConfig, labels, n_train: int, n_dev: int, T: int, world: int, device):
    print(f"model: {origin} · {model.num_params() / 1e6:.2f}M parameters · head {model.cfg.head}"
          f"×{model.cfg.head_out} · context {T} · special tokens {', '.join(TASK_TOKENS)}")
    print(f"task: {plan.task} · {n_train:,} train / {n_dev:,} dev examples"
          + (f" · labels {labels}" if labels else "") + f" · λ (lm_coef) {plan.lm_coef:g}")
    print(f"train: recipe {cfg.recipe} · batch {cfg.batch_size}×{cfg.grad_accum}×{world} · lr {cfg.lr:g} "
          f"linear, warmup {cfg.warmup_iters} · {cfg.max_iters} steps "
          f"({cfg.max_iters * cfg.batch_size * cfg.grad_accum * world / n_train:.2f} epochs) · {cfg.dtype} on {device}")


@writes_run_dir()
def finetune(out_dir: str | Path, data: str | Path | None = None, *, task: str | None = None,
             init_from: str | Path | None = None, init: str | None = None, preset_name: str | None = None,
             tokenizer: str = "gpt2", dev: str | Path | None = None, dev_fraction: float | None = None,
             fields: Fields | None = None, lm_coef: float | None = None, epochs: float | None = None,
             model_overrides: dict | None = None, train_layers: tuple[dict, ...] = (), resume: bool = False,
             quiet: bool = False, lora: dict | None = None, transfer_layers: int | None = None) -> dict:
    """Fine-tune into `out_dir`: from a pretrained run (`init_from`) or a random `preset_name` model
    (`init="random"`, with `tokenizer`: gpt2 | char | bpe:N trained on the training texts | a path).
    Both `init_from` and `init="random"`: the run's architecture and tokenizer with random weights (the
    like-for-like no-pretraining ablation). `transfer_layers` N: of `init_from`, only the embeddings and
    the first N blocks. -> the engine's final metrics (loss, val_loss, val_acc, step, ...)."""
    st = begin(out_dir, "finetune", resume)
    plan = _plan(st, data, task, dev, dev_fraction, fields, lm_coef, epochs, init_from, init, preset_name, model_overrides)
    if not plan.data:
        raise GptlabError("finetune needs --data (a JSONL, CSV or TSV file of labelled examples)")
    if not (isinstance(plan.lm_coef, (int, float)) and math.isfinite(plan.lm_coef) and plan.lm_coef >= 0):
        raise GptlabError(f"--lm-coef must be a finite number ≥ 0, got {plan.lm_coef!r}")
    cfg, given = resolve_train(RECIPE, FINETUNE_RECIPE, *st.train_layers(*train_layers, section="task",
                                                                          epochs_given=plan.epochs_given))
    examples, fields = load_examples(plan.data, plan.task, plan.fields)
    train_ex, dev_ex = (examples, load_examples(plan.dev, plan.task, fields)[0]) if plan.dev else \
        split_dev(examples, plan.dev_fraction, cfg.seed)
    labels = _labels_of(plan.task, train_ex, st.section("task").get("labels") if resume else None)
    train_y, dev_y = label_ids(plan.task, train_ex, labels, str(plan.data)), label_ids(plan.task, dev_ex, labels, str(plan.dev or plan.data))

    torch.manual_seed(cfg.seed)  # same init (new embedding rows, head) on every rank
    texts = lambda: [t for ex in (*train_ex, *dev_ex) for t in (ex.text, ex.text2 or "", *ex.choices)]  # noqa: E731
    if transfer_layers is not None and (st.resume or init_from is None or init == "random"):
        raise GptlabError("--transfer-layers chooses what a new run takes from --from RUN_DIR (without --init random)")
    lcfg = resolve_lora(st, lora)
    if lcfg.enabled and not st.resume and (init_from is None or init == "random"):
        raise GptlabError("--lora.r adapts pretrained weights: give --from RUN_DIR (without --init random)")
    model, tok, origin, new_ids = _start_model(st, plan, labels, texts, init_from, init, preset_name, tokenizer,
                                               model_overrides, quiet, transfer_layers)
    check_vocab(model.cfg, tok, "finetune")
    lora_section = attach(model, lcfg, new_ids, quiet=quiet or st.resume)
    T = min(cfg.block_size or model.cfg.block_size, model.cfg.block_size)
    cfg = dataclasses.replace(cfg, block_size=T)
    train_seqs, dev_seqs = encode_examples(plan.task, train_ex, tok, T), encode_examples(plan.task, dev_ex, tok, T)

    info, device = D.init_distributed(cfg.device)
    cfg = schedule(cfg, given, len(train_ex), plan.epochs, WARMUP_FRACTION, info.world)
    model = model.to(device)
    if info.is_main:
        init_cfg = st.saved.get("init") if resume else (
            {"from": str(Path(init_from).resolve()), "weights": "random" if init == "random" else "pretrained",
             **({"transfer_layers": transfer_layers} if transfer_layers is not None else {})}
            if init_from is not None else {"random": preset_name, "tokenizer": tokenizer})
        st.record(model.cfg, tok, stage="finetune", train=cfg.to_dict(), init=init_cfg,
                         task={"type": plan.task, "fields": fields.to_dict(), "labels": labels, "lm_coef": plan.lm_coef,
                               "epochs": plan.epochs, "n_train": len(train_ex), "n_dev": len(dev_ex)},
                         data={"train": str(Path(plan.data).resolve()), "dev": str(Path(plan.dev).resolve()) if plan.dev else None,
                               "dev_fraction": 0.0 if plan.dev else plan.dev_fraction},
                         **({"lora": lora_section} if lora_section else {}))
        if not quiet:
            _report(model, origin, plan, cfg, labels, len(train_ex), len(dev_ex), T, info.world, device)
    D.barrier(info)
    result = _train(model, cfg, st, plan, tok, train_seqs, train_y, dev_seqs, dev_y, info, device)
    if info.is_main and not quiet:
        acc = result.get("val_acc")
        print(f"done: step {result['step']}" + (f" · dev accuracy {acc:.4f} · dev task loss {result['val_loss']:.4f}"
                                                 if acc is not None else "") + f" · run dir {st.out}")
    return result


def _train(model, cfg: TrainConfig, st: Start, plan: Plan, tok, train_seqs, train_y, dev_seqs, dev_y, info, device) -> dict:
    """Batches (each micro-batch weighted by its share of the step's LM tokens), dev evaluation, the engine."""
    pad, T = tok.eot_id, cfg.block_size
    pad_multiple = 64 if cfg.compile else 1  # compiled graphs are specialised on the sequence length
    order = EpochOrder(len(train_seqs), cfg.seed, [max(map(len, ex)) for ex in train_seqs], cfg.group_by_length)
    lm_tokens = lambda i: sum(len(q) - 1 for q in train_seqs[i])  # noqa: E731  every sequence predicts its tokens after the first

    def batch_fn(step: int, sl: slice, n_global: int) -> Batch:
        idx = order.indices(step, sl, n_global)
        b = collate([train_seqs[i] for i in idx], [train_y[i] for i in idx], pad, device, pad_multiple, T)
        return b._replace(lm_weight=order.micro_weight(step, sl, n_global, lm_tokens))

    [subset] = eval_subsets(cfg.seed, (len(dev_seqs), cfg.eval_iters * cfg.batch_size))

    def dev_batches(idx: list[int]):  # sorted by length so each batch pads little
        idx = sorted(idx, key=lambda i: max(len(s) for s in dev_seqs[i]))
        for k in range(0, len(idx), cfg.batch_size):
            chunk = idx[k:k + cfg.batch_size]
            yield collate([dev_seqs[i] for i in chunk], [dev_y[i] for i in chunk], pad, device, pad_multiple, T)

    loss = FinetuneLoss(model, plan.task, plan.lm_coef)

    def eval_fn(m: torch.nn.Module, final: bool) -> dict:
        return loss.evaluate(m, dev_batches(list(range(len(dev_seqs))) if final else subset))

    tokens_per_sample = max(1, round(sum(len(s) for ex in train_seqs for s in ex) / len(train_seqs)))
    try:
        return fit(model, cfg, st, batch_fn, info=info, tokens_per_sample=tokens_per_sample, loss_fn=loss,
                   eval_fn=eval_fn if dev_seqs else None, device=device)
    finally:
        loss.close()
