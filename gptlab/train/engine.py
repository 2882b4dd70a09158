"""The one training loop. Pretraining, fine-tuning, SFT and reward modelling all run through `Trainer`:
a stage supplies the model, a batch function and a loss function; the engine owns the optimizer, the
schedule, accumulation, mixed precision, data parallelism, logging, evaluation and checkpoints.

Determinism: step s's global batch is a pure function of (seed, s), sample i of it goes to process
i // batch_size % world at micro-step i // (batch_size·world), and RNG states are checkpointed, so a
resumed run continues bit-exactly on CPU and N processes see the same data as one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from gptlab.errors import GptlabError
from gptlab.runtime import (TRAIN_DTYPES, autocast, linear_shape, peak_flops, peak_memory_mb, resolve_dtype,
                            tune_cpu_allocator)
from gptlab.train import distributed as D
from gptlab.run.format import load_state_into, tied_names
from gptlab.train.checkpoint import DCP_DIR, CheckpointManager
from gptlab.train.config import TrainConfig
from gptlab.train.loggers import parse_log_to
from gptlab.train.metrics import MetricsLogger, plot_loss, read_metrics
from gptlab.train.optim import accum_at, lr_at, make_optimizer

BatchFn = Callable[[int, slice, int], tuple]  # (step, samples of the global batch, global batch size) -> tensors
LossFn = Callable[[torch.nn.Module, tuple], torch.Tensor | None]  # None: skip this micro-batch (no backward)


def lm_loss(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    return model(x, y)[1]


def compute_dtype(cfg: TrainConfig, model: torch.nn.Module, device: torch.device, tokens_per_sample: int,
                  log: bool = True) -> torch.dtype:
    """The dtype a Trainer with these arguments computes in; for stages that run the model before training
    (DPO's reference log-probs). `auto` is measured at the model's matmul shape for one micro-batch."""
    return resolve_dtype(cfg.dtype, device, linear_shape(model, cfg.batch_size * tokens_per_sample),
                         allowed=TRAIN_DTYPES, log=log)


class Trainer:
    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, run_dir: Path, batch_fn: BatchFn, *,
                 tokens_per_sample: int, loss_fn: LossFn = lm_loss,
                 eval_fn: Callable[[torch.nn.Module, bool], dict] | None = None,
                 sample_fn: Callable[[torch.nn.Module, int], str] | None = None,
                 dist_info: D.DistInfo | None = None, device: torch.device | None = None, resume: bool = False,
                 metrics_fn: Callable[[], dict] | None = None,
                 export_fn: Callable[[dict], dict] | None = None,
                 lr_scale: Callable[[str], float] | None = None, on_checkpoint: Callable[[], None] | None = None):
        """Optional hooks for stages with several models in one module (e.g. PPO's actor + critic):
        metrics_fn() -> extra values merged into each logged record; export_fn(full state dict) -> the
        weights the run dir's top-level model.safetensors holds (checkpoints keep everything, for resume);
        lr_scale(parameter name) -> a multiplier of the scheduled lr for that parameter. A loss_fn may
        return None to skip its micro-batch; a step whose micro-batches were all skipped makes no
        optimizer update (the step still counts, so batches stay a function of the step).
        on_checkpoint() runs after each checkpoint is in place (a resumed stage records its changed config
        then: a resume that fails before its first checkpoint changes nothing)."""
        self.cfg, self.run_dir, self.on_checkpoint = cfg, Path(run_dir), on_checkpoint
        self.metrics_fn, self.export_fn = metrics_fn, export_fn
        self.info = dist_info or D.DistInfo()
        self.device = device or next(model.parameters()).device
        self.raw = model  # unwrapped: what we save and evaluate
        self.batch_fn, self.loss_fn, self.eval_fn, self.sample_fn = batch_fn, loss_fn, eval_fn, sample_fn
        self.tokens_per_sample = tokens_per_sample
        self.ckpt = CheckpointManager(self.run_dir, cfg.keep_last)
        self.step, self.tokens, self.resumed = 0, 0, resume
        # the compute dtype: `auto` measured at this model's shape, printed with its reason (gptlab.runtime)
        self.dtype = compute_dtype(cfg, model, self.device, tokens_per_sample, log=self.info.is_main)
        self.autocast = autocast(self.device, self.dtype)

        if self.device.type == "cpu":
            tune_cpu_allocator()
        self.sharded = self.info.enabled and cfg.distributed == "fsdp"
        self.model = D.wrap_model(model, self.info, self.device, cfg.distributed)
        self.raw_ddp = self.model  # the DDP wrapper (for no_sync) before any torch.compile
        self.opt = make_optimizer(self.model, cfg, self.device.type, lr_scale)
        if resume:
            self._resume()
        else:  # dropout differs across ranks; init (seeded by the caller) was identical
            torch.manual_seed(cfg.seed + self.info.rank)
        if cfg.compile:
            self.model = torch.compile(self.model)
        tracked = {"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(model.cfg) if hasattr(model, "cfg") else {}}
        self.metrics = MetricsLogger(self.run_dir, self.step if resume else None, parse_log_to(cfg.log_to, cfg.tensorboard),
                                     self.info.is_main, config=tracked)

    # --- checkpoints ---------------------------------------------------------------------------
    def _resume(self) -> None:
        path = self.ckpt.latest()
        if path is None:
            raise GptlabError(f"--resume: no checkpoint in {self.run_dir} (run without --resume to start)")
        model_sd, opt_sd, state, extra = self.ckpt.load(path)
        if not (isinstance(state.get("step"), int) and isinstance(state.get("tokens"), int) and state["step"] >= 0):
            raise GptlabError(f"{path / 'state.json'} is damaged (step and tokens must be whole numbers); "
                              "resume from an earlier checkpoint by pointing latest.json at it")
        if opt_sd is None and not state.get("sharded"):  # a fresh optimizer would break the bit-exact resume
            raise GptlabError(f"{path} holds no optimizer state, so the run cannot continue exactly; "
                              "start a new run from its weights instead")
        mode = "fsdp" if self.sharded else "replicated"
        if state.get("sharded"):  # torch.distributed.checkpoint shards: any number of processes, either mode
            scales = [g.get("lr_scale", 1.0) for g in self.opt.param_groups]
            D.load_dcp(self.model if self.sharded else self.raw, self.opt, path / DCP_DIR, self.info.enabled)
            for g, sc in zip(self.opt.param_groups, scales):
                g["lr_scale"] = sc
        elif state.get("mode", "replicated") != mode:
            raise GptlabError(f"{path} was written by a {state.get('mode')} run; resume it with the same "
                              f"--train.distributed setting (this run is {mode})")
        elif self.sharded:
            D.load_sharded(self.model, self.opt, model_sd, opt_sd)
        else:
            load_state_into(self.raw, model_sd, path)
            scales = [g.get("lr_scale", 1.0) for g in self.opt.param_groups]
            self.opt.load_state_dict(opt_sd)
            for g, sc in zip(self.opt.param_groups, scales):  # this run's setting, like the other hyper-parameters
                g["lr_scale"] = sc
        for g in self.opt.param_groups:  # hyper-parameters come from this run's config, not the checkpoint
            g.update(betas=(self.cfg.beta1, self.cfg.beta2), eps=self.cfg.eps)
            g["weight_decay"] = self.cfg.weight_decay if g["weight_decay"] else 0.0
        rng = extra.get(f"rng.torch.{self.info.rank}", extra.get("rng.torch.0"))
        if rng is not None:
            torch.set_rng_state(rng)
        cuda_rng = extra.get(f"rng.cuda.{self.info.rank}")
        if cuda_rng is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(cuda_rng, self.device)
        self.step, self.tokens = state["step"], state["tokens"]
        if self.info.is_main:
            print(f"resumed from {path} at step {self.step} ({self.tokens:,} tokens)")

    def _rng_states(self) -> dict[str, torch.Tensor]:
        """Every rank's RNG states (a collective: all ranks call it), for rank 0 to write."""
        rngs = D.gather_objects(torch.get_rng_state(), self.info)
        cuda = D.gather_objects(torch.cuda.get_rng_state(self.device), self.info) if self.device.type == "cuda" else []
        return {**{f"rng.torch.{r}": t for r, t in enumerate(rngs)}, **{f"rng.cuda.{r}": t for r, t in enumerate(cuda)}}

    def _commit(self, write) -> None:
        """Rank 0: write() the checkpoint, then on_checkpoint; a failed write (disk full, read-only, quota) is
        one line saying which checkpoint is intact."""
        previous = self.ckpt.latest()
        try:
            write()
            if self.on_checkpoint is not None:
                self.on_checkpoint()
        except OSError as e:  # the previous checkpoint is untouched
            kept = (f"the last checkpoint, {previous.name}, is intact: free space, then --resume" if previous
                    else "no checkpoint was written yet")
            raise GptlabError(f"cannot write the step {self.step} checkpoint in {self.run_dir}: "
                              f"{e.strerror or e} ({kept})") from None

    def _save_sharded(self, bad: torch.Tensor) -> None:
        """FSDP: every rank writes its shards of the weights and optimizer state into the staged checkpoint
        (torch.distributed.checkpoint; the optimizer state, 2/3 of it, is never gathered); rank 0 then
        completes it (RNG states, state.json) and writes the run's full model.safetensors."""
        full = D.full_model_state(self.model)  # rank 0: the run's weights; also checked for NaN/inf
        self.check_finite(bad, full if self.info.is_main else None)
        extra = self._rng_states()
        if self.info.is_main:
            self.ckpt.staging(self.step)
        D.barrier(self.info)
        D.save_dcp(self.model, self.opt, self.ckpt.staging(self.step, fresh=False) / DCP_DIR)
        D.barrier(self.info)
        if self.info.is_main:
            tied = tied_names(self.raw)
            export = {k: v.detach().contiguous() for k, v in full.items() if k not in tied}
            if self.export_fn is not None:
                export = {k: v.detach().contiguous() for k, v in self.export_fn(export).items()}
            self._commit(lambda: self.ckpt.save(self.step, None, {"tokens": self.tokens, "mode": "fsdp", "sharded": True},
                                                None, extra, export_sd=export, staged=True))
        D.barrier(self.info)

    def check_finite(self, bad: torch.Tensor, weights: dict | None = None) -> None:
        """Raise on every rank together if any rank saw a non-finite loss (or rank 0 non-finite weights)."""
        flag = bad.float()
        if weights is not None and not all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()):
            flag = torch.ones_like(flag)
        if D.all_reduce_max(flag, self.info).item():
            latest = self.ckpt.latest()
            advice = (f"the last good checkpoint is kept ({latest.name}): lower the learning rate (--train.lr) or "
                      "check the data, then --resume" if latest else
                      "no checkpoint was written yet: lower the learning rate (--train.lr) or check the data, and "
                      f"start again (another --out, or remove {self.run_dir})")
            raise GptlabError(f"loss or weights became NaN/inf by step {self.step}; stopped without saving; {advice}")

    def save(self, bad: torch.Tensor) -> None:
        latest = self.ckpt.latest()
        if latest is not None and latest.name == f"step_{self.step:07d}":
            return  # nothing trained since that checkpoint (e.g. resuming a finished run)
        if self.sharded:
            return self._save_sharded(bad)
        model_sd, opt_sd = self.raw.state_dict(), self.opt.state_dict()
        self.check_finite(bad, model_sd)
        extra = self._rng_states()
        if self.info.is_main:
            tied = tied_names(self.raw)  # a tied LM head is stored once, as the tensor it shares
            model_sd = {k: v.detach().contiguous() for k, v in model_sd.items() if k not in tied}
            export = None
            if self.export_fn is not None:
                export = {k: v.detach().contiguous() for k, v in self.export_fn(model_sd).items()}
            self._commit(lambda: self.ckpt.save(self.step, opt_sd, {"tokens": self.tokens, "mode": "replicated"},
                                                model_sd, extra, export_sd=export))
        D.barrier(self.info)

    # --- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, final: bool = False) -> dict:
        if self.eval_fn is None:
            return {}
        eval_model = self.model if self.sharded else self.raw  # FSDP's forward all-gathers on every rank
        eval_model.eval()
        with self.autocast:
            out = self.eval_fn(eval_model, final)
        self.model.train()
        return out

    # --- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, info = self.cfg, self.info
        if self.resumed and self._done():
            return self._finished()
        bar = tqdm(total=cfg.max_iters, initial=self.step, disable=not info.is_main, dynamic_ncols=True,
                   desc=self.run_dir.name)
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        try:
            last = self._loop(bar, bad)
        finally:
            bar.close()  # an error is then printed on a line of its own, not on the bar's
        self.check_finite(bad)
        final = self.evaluate(final=True)
        if final:
            self.metrics.log(self.step, **final)
        self.save(bad)
        self.metrics.close()
        if info.is_main:
            plot_loss(self.metrics.path, self.run_dir / "loss.png")
        return {**last, **final, "step": self.step}

    def _done(self) -> bool:
        return self.step >= self.cfg.max_iters or bool(self.cfg.max_tokens and self.tokens >= self.cfg.max_tokens)

    def _finished(self) -> dict:
        """--resume of a run that has nothing left to do: say so, change nothing, return its final figures."""
        if self.info.is_main:
            print(f"{self.run_dir} is finished (step {self.step} of {self.cfg.max_iters}); nothing to do. Raise "
                  "--train.max_iters (or max_tokens) to train further.", file=sys.stderr)
        final = {}
        for r in read_metrics(self.metrics.path):
            if r.get("step") == self.step:
                final.update({k: v for k, v in r.items() if k != "time"})
        return {**final, "step": self.step}

    def _step(self, bad: torch.Tensor, params: list, tokens_per_micro: int) -> dict:
        """One optimizer step over its micro-batches (gradient accumulation, DDP/FSDP sync on the last)."""
        cfg, info, B = self.cfg, self.info, self.cfg.batch_size
        accum = accum_at(cfg, self.tokens, tokens_per_micro)
        lr = lr_at(cfg, self.step, self.tokens)
        for g in self.opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        n_global = B * accum * info.world
        loss_sum = torch.zeros((), device=self.device)
        used = 0
        for m in range(accum):
            start = (m * info.world + info.rank) * B
            batch = self.batch_fn(self.step, slice(start, start + B), n_global)
            last_micro = m == accum - 1
            if self.sharded:  # reduce-scatter gradients once per step, not per micro-step
                self.raw.set_requires_gradient_sync(last_micro)
            no_sync = info.enabled and not self.sharded and not last_micro
            with (self.raw_ddp.no_sync() if no_sync else contextlib.nullcontext()), self.autocast:
                loss = self.loss_fn(self.model, batch)
            if loss is None:  # the stage skips this micro-batch (e.g. PPO's ratio guard)
                if info.enabled:
                    raise GptlabError("skipping micro-batches is not supported with several processes")
                continue
            (loss / accum).backward()
            loss_sum += loss.detach().float()
            used += 1
        grad_norm = None
        if used:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else None
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        bad |= ~torch.isfinite(loss_sum)  # checked at log and save time: no per-step host sync
        self.step += 1
        self.tokens += n_global * self.tokens_per_sample
        return {"loss_sum": loss_sum, "accum": accum, "lr": lr, "batch_tokens": n_global * self.tokens_per_sample,
                "grad_norm": grad_norm}

    def _loop(self, bar, bad: torch.Tensor) -> dict:
        cfg, info = self.cfg, self.info
        tokens_per_micro = cfg.batch_size * self.tokens_per_sample * info.world
        flops_per_token = self.raw.flops_per_token(self.tokens_per_sample) if hasattr(self.raw, "flops_per_token") else 0
        peak = cfg.peak_flops or peak_flops(self.device, self.dtype)  # of the dtype in use, measured here
        params = [p for p in self.model.parameters() if p.requires_grad]
        last = {}
        self.model.train()
        t0, tok0 = time.perf_counter(), self.tokens
        while not self._done():
            st = self._step(bad, params, tokens_per_micro)
            bar.update(1)
            if self.step % cfg.log_interval == 0 or self._done():
                loss_val = D.all_reduce_mean(st["loss_sum"] / st["accum"], info).item()
                if not math.isfinite(loss_val):
                    self.check_finite(torch.ones((), dtype=torch.bool, device=self.device))
                tps = (self.tokens - tok0) / max(time.perf_counter() - t0, 1e-9)
                mfu = flops_per_token * tps / (peak * info.world) if peak else 0.0
                last = dict(loss=loss_val, lr=st["lr"], tokens=self.tokens, tok_per_s=tps, mfu=mfu,
                            batch_tokens=st["batch_tokens"], peak_mem_mb=peak_memory_mb(self.device))
                if st["grad_norm"] is not None:
                    last["grad_norm"] = float(st["grad_norm"])
                if self.metrics_fn is not None:
                    last.update(self.metrics_fn() or {})
                self.metrics.log(self.step, **last)
                bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{st['lr']:.2e}", tok_s=f"{tps:,.0f}", mfu=f"{100 * mfu:.1f}%")
                t0, tok0 = time.perf_counter(), self.tokens
            if self._side_work(bar, bad):  # eval, samples and saves are not training throughput
                t0, tok0 = time.perf_counter(), self.tokens
        return last

    def _side_work(self, bar, bad: torch.Tensor) -> bool:
        """Periodic evaluation, text samples and checkpoints after this step -> whether any ran."""
        cfg, info, ran = self.cfg, self.info, False
        if cfg.eval_interval and self.step % cfg.eval_interval == 0 and not self._done():
            self.check_finite(bad)
            ev = self.evaluate()
            if ev:
                self.metrics.log(self.step, **ev)
                bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
            ran = True
        if cfg.sample_interval and self.step % cfg.sample_interval == 0 and self.sample_fn:
            self.check_finite(bad)
            if info.is_main or self.sharded:  # FSDP's forward needs every rank
                with torch.no_grad(), self.autocast:
                    text = self.sample_fn(self.model if self.sharded else self.raw, self.step)
                if info.is_main:
                    bar.write(f"--- sample at step {self.step} ---\n{text}\n---")
            ran = True
        if cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0 and not self._done():
            self.save(bad)
            ran = True
        return ran
