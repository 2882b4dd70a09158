"""Evaluation without gradient updates: perplexity / bits per byte with rolling windows (GPT-2 zero-shot),
and zero-, one- and few-shot tasks (GPT-3 in-context learning) in a small task format gptlab owns.
`gptlab.evaluate.lm_eval_adapter` (optional extra `eval`) exposes a run to lm-evaluation-harness."""

from gptlab.evaluate.fewshot import DemoSampler, fit_shots
from gptlab.evaluate.harness import build_context, evaluate_tasks, run_task
from gptlab.evaluate.perplexity import bits_per_byte, file_perplexity, text_perplexity
from gptlab.evaluate.scoring import Score, encode_pair, loglikelihood_rolling, rolling_pairs, score_pairs
from gptlab.evaluate.tasks import Task, list_builtin_tasks, load_task

__all__ = ["DemoSampler", "Score", "Task", "bits_per_byte", "build_context", "encode_pair", "evaluate_tasks",
           "file_perplexity", "fit_shots", "list_builtin_tasks", "load_task", "loglikelihood_rolling", "rolling_pairs",
           "run_task", "score_pairs", "text_perplexity"]
