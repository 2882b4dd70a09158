"""The stage layer: what every training stage (pretrain, finetune, sft, reward, dpo, ppo, the next ones)
does the same way, so that a stage file holds only its data, its loss and its figures.

- `begin`: start a run dir, or resume one (checked to be this stage's; "out holds another run" refused);
  the saved settings and the train layer a resume continues with.
- `resolve_train`: recipe ← saved run ← YAML ← flags -> TrainConfig and the keys that were set.
- `schedule`: epochs -> steps, warmup as a fraction of them (unless set by hand).
- `EpochOrder`: the seeded order of examples in an endless stream of epochs; `micro_weight` weights a
  micro-batch by its share of the step's tokens.
- `split_heldout`, `eval_subsets`: seeded held-out splits and evaluation subsets.
- `load_pretrained`: a run's model (without a task head) and tokenizer, to start a stage from.
- `fit`: the engine's run with the process group cleaned up on any exit.
"""

from gptlab.stage.data import EpochOrder, eval_subsets, split_heldout
from gptlab.stage.models import NO_DROPOUT, load_pretrained, single_process, unwrap
from gptlab.stage.setup import Start, begin, fit, resolve_train, schedule

__all__ = ["EpochOrder", "NO_DROPOUT", "Start", "begin", "eval_subsets", "fit", "load_pretrained", "resolve_train",
           "schedule", "single_process", "split_heldout", "unwrap"]
