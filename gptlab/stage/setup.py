"""Starting or resuming a stage's run dir and resolving its training config."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from gptlab.errors import GptlabError
from gptlab.run import read_run_config, write_run_config
from gptlab.run.format import LATEST_FILE
from gptlab.train import distributed as D
from gptlab.train.config import TrainConfig, resolve_train  # noqa: F401  (part of the stage layer)

# the train keys a resume recomputes (from the saved epochs) unless they were set by hand
SCHEDULE_KEYS = ("max_iters", "warmup_iters")


@dataclass
class Start:
    """A stage's run dir at its start: `saved` is the run's config when resuming ({} otherwise)."""
    out: Path
    stage: str
    resume: bool
    saved: dict
    pending: tuple | None = None  # a resumed run's new config.json, written with its first checkpoint

    def record(self, model_cfg, tokenizer, **sections) -> None:
        """The run's config.json: written now when the run starts; when it resumes, only once a checkpoint
        with these settings is in place (`on_checkpoint`), so a resume that fails (NaN, a bad value, a
        kill) leaves the recorded settings as they were."""
        if self.resume:
            self.pending = (model_cfg, tokenizer, sections)
        else:
            write_run_config(self.out, model_cfg, tokenizer, **sections)

    def on_checkpoint(self) -> None:
        if self.pending is not None:
            model_cfg, tokenizer, sections = self.pending
            write_run_config(self.out, model_cfg, tokenizer, **sections)
            self.pending = None

    def section(self, key: str | None = None) -> dict:
        """The stage's own saved settings (config.json[key or stage])."""
        return self.saved.get(key or self.stage, {}) if self.resume else {}

    def kept(self, key: str, given, section: str | None = None):
        """A setting fixed when the run started (it shapes the data): the saved value wins on resume."""
        return self.section(section).get(key, given) if self.resume else given

    def init_from(self, given):
        return (given or self.saved.get("init", {}).get("from")) if self.resume else given

    def data(self, given, what: str, section: str | None = None):
        """The data source: given, or the saved path on resume; missing is a one-line error."""
        data = given if given is not None else self.section(section).get("data")
        if data is None:
            raise GptlabError(f"{self.stage} needs --data ({what})"
                              + ("; the resumed run was trained from in-memory rows: pass them again" if self.resume else ""))
        return data

    def train_layers(self, *layers: dict, section: str | None = None, epochs_given: bool = False) -> tuple[dict, ...]:
        """The saved train keys first when resuming, then `layers`. max_iters/warmup_iters come back only if
        they were set by hand (recorded as max_iters_given), or, for runs that did not record it, unless
        --epochs is given again: otherwise the schedule is recomputed from the epochs."""
        if not self.resume:
            return layers
        st = self.section(section)
        keep = st["max_iters_given"] if "max_iters_given" in st else not epochs_given
        saved = {k: v for k, v in self.saved.get("train", {}).items() if keep or k not in SCHEDULE_KEYS}
        return (saved, *layers)


def begin(out_dir, stage: str, resume: bool) -> Start:
    """Start `stage` in `out_dir`, or resume it: the saved run must be this stage's, and a new start refuses
    a directory that already holds a run."""
    out = Path(out_dir)
    if resume:
        saved = read_run_config(out)
        if saved.get("stage") != stage:
            raise GptlabError(f"{out} holds a {saved.get('stage')!r} run, not a {stage} run; --resume continues a {stage} run")
        return Start(out, stage, True, saved)
    if (out / LATEST_FILE).exists():
        raise GptlabError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    return Start(out, stage, False, {})


def schedule(cfg: TrainConfig, given: set[str], n_train: int, epochs: float, warmup_fraction: float,
             world: int = 1) -> TrainConfig:
    """max_iters = epochs over n_train samples (unless set); warmup = a fraction of the steps (unless set);
    step-counted schedules (the token-counted warmup/decay of the pretraining recipes off)."""
    if not (isinstance(epochs, (int, float)) and math.isfinite(epochs) and epochs > 0):
        raise GptlabError(f"--epochs must be a positive number, got {epochs!r}")
    steps = cfg.max_iters if "max_iters" in given else \
        max(1, math.ceil(epochs * n_train / (cfg.batch_size * cfg.grad_accum * world)))
    warm = cfg.warmup_iters if "warmup_iters" in given else math.ceil(warmup_fraction * (cfg.decay_iters or steps))
    return dataclasses.replace(cfg, max_iters=steps, warmup_iters=warm, warmup_tokens=0, decay_tokens=0,
                               batch_warmup_tokens=0)


def fit(model: torch.nn.Module, cfg: TrainConfig, st: Start, batch_fn, *, info: D.DistInfo, **trainer_kw) -> dict:
    """Train with the one engine in the stage's run dir (resuming if it resumes; its new config recorded
    with the first checkpoint); the process group is released on any exit."""
    from gptlab.stage.lora import lora_hooks
    from gptlab.train.engine import Trainer

    try:
        hooks = lora_hooks(model, st.out, st.on_checkpoint)
        if hooks and info.enabled and cfg.distributed == "fsdp":
            raise GptlabError("LoRA trains under DDP (--train.distributed ddp): its frozen base is not sharded")
        hooks.setdefault("on_checkpoint", st.on_checkpoint)
        return Trainer(model, cfg, st.out, batch_fn, dist_info=info, resume=st.resume, **hooks, **trainer_kw).fit()
    finally:
        D.cleanup(info)
