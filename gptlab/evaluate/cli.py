"""`gptlab evaluate`: perplexity / bits per byte of text files, and zero-, one- and few-shot tasks.

    gptlab evaluate RUN_DIR --perplexity FILE [--stride N]
    gptlab evaluate RUN_DIR --task sst2 --task my_task.yaml --shots 4 --seed 1234 --limit 200 --json out.json
    gptlab evaluate RUN_DIR --lm-eval TASK[,TASK] [--include-path DIR]     # through lm-evaluation-harness
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gptlab.config import add_dtype_arg
from gptlab.errors import GptlabError


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    from gptlab.evaluate.tasks import list_builtin_tasks

    e = subparsers.add_parser(
        "evaluate", help="perplexity and zero/one/few-shot evaluation (GPT-2 zero-shot, GPT-3 in-context learning)",
        description="Evaluate a run without gradient updates: perplexity and bits per byte of text files (rolling "
                    "windows), and tasks (multiple choice, last word, generation) with K demonstrations in the prompt.")
    e.add_argument("run_dir")
    e.add_argument("--perplexity", action="append", default=[], metavar="FILE",
                   help="UTF-8 text file, one document (repeatable; totals over all files)")
    e.add_argument("--stride", type=int, default=None,
                   help="perplexity: tokens newly predicted per window after the first (default: half the context; "
                        "1 = the most context for every token, the context length = lm-eval's disjoint windows)")
    e.add_argument("--task", action="append", default=[], metavar="NAME|FILE[=DATA]",
                   help=f"built-in task ({', '.join(list_builtin_tasks())}) or a task YAML/JSON file; NAME=PATH reads "
                        "another data file (repeatable)")
    e.add_argument("--data-root", default=None, help="where built-in tasks find their data (default: $GPTLAB_DATA or .)")
    e.add_argument("--shots", type=int, default=None,
                   help="demonstrations per example (K; default 0, for --lm-eval the task's default); lowered where "
                        "they do not fit the context")
    e.add_argument("--seed", type=int, default=1234, help="seed of the demonstration draw (lm-eval's default 1234)")
    e.add_argument("--limit", type=int, default=None, help="evaluate the first N examples of each task")
    e.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    e.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT ('-' = stdout)")
    e.add_argument("--log-samples", action="store_true", help="include every example's prompt and scores in the JSON")
    e.add_argument("--device", default="cpu")
    add_dtype_arg(e)
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = e.add_argument_group("decoding for generate tasks (defaults: the task's own, else greedy, 32 tokens, stop at newline)")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--temperature", type=float, help="0 = greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--no-repeat-ngram-size", type=int)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable; replaces the task's)")
    g.add_argument("--num-beams", type=int, help="> 1: beam search (GPT-3 used 4)")
    g.add_argument("--length-penalty", type=float, help="beam score / length ** α (GPT-3 used 0.6)")
    g.add_argument("--gen-seed", type=int, help="sampling seed")
    h = e.add_argument_group("lm-evaluation-harness (pip install gptlab[eval])")
    h.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-eval task names, run through the gptlab adapter")
    h.add_argument("--include-path", help="folder of extra lm-eval task YAMLs")
    e.set_defaults(func=cmd_evaluate)
    return e


_GEN_FLAGS = {"max_new_tokens": "max_new_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
              "min_p": "min_p", "repetition_penalty": "repetition_penalty", "no_repeat_ngram_size": "no_repeat_ngram_size",
              "stop": "stop", "num_beams": "num_beams", "length_penalty": "length_penalty", "gen_seed": "seed"}


def sampling_overrides(a) -> dict:
    return {field: getattr(a, flag) for flag, field in _GEN_FLAGS.items() if getattr(a, flag, None) is not None}


def cmd_evaluate(a) -> dict:
    from gptlab import __version__
    from gptlab.evaluate.report import format_table, write_json
    from gptlab.runtime import dtype_name, linear_shape, resolve_dtype

    if not (a.perplexity or a.task or a.lm_eval):
        raise GptlabError("nothing to evaluate: give --perplexity FILE, --task NAME and/or --lm-eval TASKS")
    if a.batch_size < 1:
        raise GptlabError(f"--batch-size must be ≥ 1, got {a.batch_size}")
    if a.stride is not None and a.stride < 1:
        raise GptlabError(f"--stride must be ≥ 1, got {a.stride}")
    from gptlab.evaluate.tasks import load_task

    tasks = [load_task(t) for t in a.task]  # bad task files and missing data fail before the model loads
    for t in tasks:
        t.check_data(a.data_root)
    for f in a.perplexity:
        if not Path(f).is_file():
            raise GptlabError(f"perplexity: file not found: {f}")
    from gptlab.run import load_run

    run = load_run(a.run_dir, device=a.device)
    model, tok = run.model, run.tokenizer
    model.to(resolve_dtype(a.dtype, a.device, linear_shape(model, a.batch_size * model.cfg.block_size)))
    report: dict = {
        "run_dir": str(a.run_dir), "gptlab": __version__,
        "model": {"parameters": model.num_params(), "block_size": model.cfg.block_size,
                  "dtype": dtype_name(model.wte.weight.dtype)},
        "config": {"shots": a.shots or 0, "seed": a.seed, "limit": a.limit, "batch_size": a.batch_size,
                   "sampling": sampling_overrides(a)},
    }
    progress = not a.no_progress and sys.stderr.isatty()
    if a.perplexity:
        from gptlab.evaluate.perplexity import file_perplexity

        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(desc="perplexity", unit="window", file=sys.stderr, leave=False)
        report["perplexity"] = file_perplexity(model, tok, a.perplexity, a.stride, a.batch_size,
                                               bar.update if bar else None).to_dict()
        if bar:
            bar.close()
    if tasks:
        from gptlab.evaluate.harness import evaluate_tasks

        report["results"] = evaluate_tasks(model, tok, tasks, shots=a.shots or 0, seed=a.seed, limit=a.limit,
                                           batch_size=a.batch_size, data_root=a.data_root,
                                           sampling=sampling_overrides(a), log_samples=a.log_samples, progress=progress)
    out = sys.stderr if a.json == "-" else sys.stdout  # keep stdout pure JSON with --json -
    if a.perplexity or tasks:
        print(format_table(report), file=out)
    if a.lm_eval:
        report["lm_eval"] = run_lm_eval(model, tok, a, out)
    if a.json:
        write_json(report, a.json)
    return report


def run_lm_eval(model, tok, a, out=sys.stdout) -> dict:
    from gptlab.evaluate.lm_eval_adapter import GptlabLM

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    lm = GptlabLM(model=model, tokenizer=tok, batch_size=a.batch_size)
    tm = TaskManager(include_path=a.include_path) if a.include_path else TaskManager()
    names = [t.strip() for t in a.lm_eval.split(",") if t.strip()]
    res = simple_evaluate(model=lm, tasks=names, task_manager=tm, num_fewshot=a.shots,
                          limit=a.limit, fewshot_random_seed=a.seed, log_samples=a.log_samples)
    if res is None:
        raise GptlabError("lm-eval returned no results")
    print(make_table(res), file=out)
    keep = {k: res[k] for k in ("results", "configs", "versions", "n-shot", "n-samples") if k in res}
    if a.log_samples and "samples" in res:
        keep["samples"] = res["samples"]
    import json

    return json.loads(json.dumps(keep, default=str))  # lm-eval results hold numpy scalars and callables


def register(sub) -> None:
    add_evaluate_parser(sub)
