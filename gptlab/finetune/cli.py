"""`gptlab finetune` and `gptlab classify`: parsers with set_defaults(func=...), wired into gptlab/cli.py."""

from __future__ import annotations

import argparse
import json
import sys

from gptlab.config import add_dtype_arg


def _fields(a):
    from gptlab.finetune.data import Fields

    return Fields(text=a.text_field, text2=a.text2_field, context=a.context_field, choices=a.choices_field,
                  label=a.label_field)


def _add_field_args(p: argparse.ArgumentParser, defaults_note: str) -> None:
    g = p.add_argument_group(f"data fields ({defaults_note})")
    g.add_argument("--text-field", "--premise-field", dest="text_field",
                   help="text (classification), premise (entailment), sentence 1 (similarity) "
                        "[default: text|sentence, premise|sentence1, sentence1|text]")
    g.add_argument("--text2-field", "--hypothesis-field", dest="text2_field",
                   help="hypothesis (entailment), sentence 2 (similarity) [default: hypothesis|sentence2, sentence2|text2]")
    g.add_argument("--context-field", help="multiple choice: the shared context [default: context|text|question|story]")
    g.add_argument("--choices-field", help="multiple choice: a field holding a list of answers, or comma-separated "
                                           "columns one per answer [default: choices|endings|options]")
    g.add_argument("--label-field", help="class name, or the right choice's index (0-based) or text [default: label|answer]")


def cmd_finetune(a) -> None:
    from gptlab.config import read_config, section_layer
    from gptlab.errors import GptlabError
    from gptlab.finetune.train import finetune
    from gptlab.model import GPTConfig
    from gptlab.train.config import TrainConfig

    from gptlab.stage.lora import LoRAConfig

    y = read_config(a.config, ("model", "train", "lora"))
    if not a.out:
        raise GptlabError("finetune needs --out (the run dir to write)")
    finetune(a.out, a.data, task=a.task, init_from=a.init_from, init=a.init, preset_name=a.preset,
             tokenizer=a.tokenizer, dev=a.dev, dev_fraction=a.dev_fraction, fields=_fields(a), lm_coef=a.lm_coef,
             epochs=a.epochs, transfer_layers=a.transfer_layers, model_overrides=section_layer(a, y, GPTConfig, "model"),
             train_layers=(section_layer(a, y, TrainConfig, "train"),), resume=a.resume,
             lora=section_layer(a, y, LoRAConfig, "lora"))


def add_finetune_parser(sub) -> argparse.ArgumentParser:
    from gptlab.config import add_dataclass_args
    from gptlab.finetune.data import TASKS
    from gptlab.model import GPTConfig, PRESETS
    from gptlab.train.config import TrainConfig

    p = sub.add_parser("finetune", help="GPT-1 discriminative fine-tuning: classification, entailment, similarity, "
                                        "multiple choice (task head + LM auxiliary loss)")
    src = p.add_argument_group("initialisation")
    src.add_argument("--from", dest="init_from", metavar="RUN_DIR", help="pretrained run directory to fine-tune")
    src.add_argument("--init", choices=["random"], help="random weights (the no-pretraining ablation): with --preset, "
                                                       "or with --from RUN_DIR for that run's architecture and tokenizer")
    src.add_argument("--transfer-layers", type=int, metavar="N", default=None,
                     help="with --from: keep the embeddings and the first N blocks, re-initialise the rest "
                          "(GPT-1 Figure 2, left) [default: all]")
    src.add_argument("--preset", help=f"with --init random: {', '.join(PRESETS)}")
    src.add_argument("--tokenizer", default="gpt2",
                     help="with --init random: gpt2 | char | bpe:N (trained on the training texts) | a tokenizer file "
                          "or run/data dir (use the pretrained run's, for a like-for-like ablation) [default: gpt2]")
    p.add_argument("--data", help="training examples: .jsonl, .csv or .tsv (header line; SST-2's label<TAB>sentence as is)")
    p.add_argument("--dev", help="dev examples (same format); default: split --dev-fraction off --data")
    p.add_argument("--dev-fraction", type=float, default=None, help="seeded random dev split of --data [default: 0.1]")
    p.add_argument("--task", choices=TASKS, default=None, help="input transformation and head [default: classification]")
    _add_field_args(p, "unset: the usual column names")
    p.add_argument("--out", help="run directory to write")
    p.add_argument("--lm-coef", type=float, default=None,
                   help="λ: weight of the auxiliary LM loss, L3 = L2 + λ·L1 (0 = off) [default: 0.5]")
    p.add_argument("--epochs", type=float, default=None,
                   help="epochs over the training set; sets train.max_iters unless given [default: 3]")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--config", help="YAML with model: {...} and train: {...} sections")
    add_dataclass_args(p, TrainConfig, "train")
    add_dataclass_args(p, GPTConfig, "model")
    from gptlab.stage.lora import add_lora_args

    add_lora_args(p)
    p.set_defaults(func=cmd_finetune)
    return p


def cmd_classify(a) -> None:
    from gptlab.errors import GptlabError
    from gptlab.finetune.data import Example, Fields, label_ids, load_examples
    from gptlab.finetune.predict import predict, task_of
    from gptlab.run import load_run

    if (a.file is None) == (not a.text):
        raise GptlabError("classify needs --text (repeatable) or --file, not both")
    run = load_run(a.run_dir, device=a.device)
    info = task_of(run)
    task = info["type"]
    labels = None
    if a.file:
        saved = Fields(**info.get("fields", {}))
        given = _fields(a)
        fields = Fields(**{k: getattr(given, k) or getattr(saved, k) for k in saved.to_dict()})
        examples, resolved = load_examples(a.file, task, fields, need_label=False)
        if resolved.label:
            labels = label_ids(task, examples, info.get("labels"), a.file)
    elif task == "classification":
        examples = [Example(t) for t in a.text]
    elif task == "multiple_choice":
        if len(a.text) != 1 or len(a.choice) < 2:
            raise GptlabError("multiple_choice: pass one --text (the context) and at least two --choice")
        examples = [Example(a.text[0], choices=tuple(a.choice))]
    else:
        if len(a.text2) != len(a.text):
            raise GptlabError(f"{task} takes pairs: pass one --text2 for each --text ({len(a.text)} --text, "
                              f"{len(a.text2)} --text2)")
        examples = [Example(t, t2) for t, t2 in zip(a.text, a.text2)]
    from gptlab.runtime import linear_shape, resolve_dtype

    run.model.to(resolve_dtype(a.dtype, a.device, linear_shape(run.model, a.batch_size * run.model.cfg.block_size)))
    preds = predict(run, examples, batch_size=a.batch_size)
    for p in preds:
        if a.json:
            print(json.dumps(p.to_dict(), ensure_ascii=False))
        else:
            print(f"{p.label}\t{p.prob:.4f}" + (f"\t{p.choice}" if p.choice is not None else ""))
    if labels is not None:
        right = sum(int(p.label == (str(y) if task == "multiple_choice" else info["labels"][y])) for p, y in zip(preds, labels))
        print(f"accuracy {right / len(preds):.4f} ({right}/{len(preds)}) against the file's labels", file=sys.stderr)


def add_classify_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("classify", help="predict with a fine-tuned run: label and probability per input")
    p.add_argument("run_dir")
    p.add_argument("--text", action="append", default=[],
                   help="text to classify (repeatable); premise / sentence 1 / context for the other tasks")
    p.add_argument("--text2", action="append", default=[], help="entailment / similarity: the second text of each --text")
    p.add_argument("--choice", action="append", default=[], help="multiple choice: a candidate answer (repeatable)")
    p.add_argument("--file", help="batch prediction: a .jsonl, .csv or .tsv file; with a label column the accuracy "
                                  "is printed to stderr")
    _add_field_args(p, "unset: the run's own mapping, then the usual names")
    p.add_argument("--json", action="store_true", help="one JSON object per line: label, prob, probs (, choice)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    add_dtype_arg(p)
    p.set_defaults(func=cmd_classify)
    return p


def register(sub) -> None:
    add_finetune_parser(sub)
    add_classify_parser(sub)
