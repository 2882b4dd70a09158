"""GPT-1 discriminative fine-tuning (paper §3.2–3.3): task input transformations with learned start,
delimiter and extract tokens, a task head on the one GPT class, L3 = L2 + λ·L1 on the one training engine."""

from gptlab.finetune.data import TASKS, Example, Fields, load_examples
from gptlab.finetune.predict import Prediction, predict
from gptlab.finetune.tasks import TASK_TOKENS, add_task_tokens, encode_examples, transform
from gptlab.finetune.train import FinetuneLoss, finetune

__all__ = ["TASKS", "TASK_TOKENS", "Example", "Fields", "FinetuneLoss", "Prediction", "add_task_tokens",
           "encode_examples", "finetune", "load_examples", "predict", "transform"]
