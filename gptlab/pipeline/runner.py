"""`gptlab pipeline`: run the stages in order, skipping the ones whose cached result is still valid."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.pipeline.config import PipelineConfig
from gptlab.pipeline.stages import SECTION, STAGE_NAMES, STAGES, Ctx, Stage, stage
from gptlab.pipeline.state import PipelineState, stage_hash
from gptlab.run.format import LATEST_FILE
from gptlab.fileio import atomic_write_json
from gptlab.run.lock import RunLock


def _fmt(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _bar(done: int, total: int, width: int = 20) -> str:
    k = round(width * done / max(total, 1))
    return "█" * k + "·" * (width - k)


def section_of(cfg: PipelineConfig, s: Stage) -> dict:
    return cfg.section(SECTION.get(s.name, s.name))


def compute_hashes(ctx: Ctx) -> dict[str, str]:
    """Each stage's cache key: its config section, the corpus and seed where they matter, the user files it
    names and the keys of the stages it reads — so a change anywhere upstream reaches it."""
    hashes: dict[str, str] = {}
    for s in STAGES:
        c = section_of(ctx.cfg, s)
        if not s.enabled(ctx, c):
            hashes[s.name] = "off"
            continue
        config = {"section": c, "corpus": ctx.cfg.corpus, "seed": ctx.cfg.seed}
        hashes[s.name] = stage_hash(s.name, config, {d: hashes[d] for d in s.deps}, s.files(ctx, c))
    return hashes


def run_pipeline(cfg: PipelineConfig, *, from_stage: str | None = None, only: str | None = None,
                 resume_cmd: str = "gptlab pipeline", serve: bool = False, quiet: bool = False) -> dict:
    """Run (or resume) the pipeline in `cfg.out`; returns {stage: result}. Writes report/ at the end. Holds
    the pipeline directory's lock throughout (each stage also locks its own run dir)."""
    for name in (from_stage, only):
        if name:
            stage(name)  # validates the name
    if serve:
        cfg.serve["enabled"] = True
    with RunLock(cfg.out):
        return _run(cfg, from_stage, only, resume_cmd, quiet)


def _run(cfg: PipelineConfig, from_stage: str | None, only: str | None, resume_cmd: str, quiet: bool) -> dict:
    from gptlab.pipeline.report import write_report

    root = Path(cfg.out)
    atomic_write_json(root / "pipeline.json", cfg.to_dict())  # the merged config this run used
    state = PipelineState(root)
    ctx = Ctx(cfg, root, state)
    hashes = compute_hashes(ctx)
    active = [s for s in STAGES if hashes[s.name] != "off"]
    forced = set(STAGE_NAMES[STAGE_NAMES.index(from_stage):]) if from_stage else set()
    if only:
        stale = [d for d in _upstream(only) if hashes[d] != "off" and not state.is_done(d, hashes[d])]
        if stale:
            raise GptlabError(f"--only {only}: the stages it reads from are not finished or are out of date: "
                              f"{', '.join(stale)} (run them first, e.g. `{resume_cmd}`)")
        if hashes[only] == "off":
            raise GptlabError(f"--only {only}: the stage is disabled in the config ({only}.enabled: false)")
        forced, active = {only}, [stage(only)]

    t_start, ran = time.perf_counter(), 0
    say = (lambda *a, **k: None) if quiet else (lambda msg: print(msg, flush=True))
    for i, s in enumerate(active, 1):
        h, c = hashes[s.name], section_of(cfg, s)
        head = f"[{_bar(i - 1, len(active))}] {i:>2}/{len(active)} {s.name:<15}"
        if s.name != "serve" and s.name not in forced and state.is_done(s.name, h):
            say(f"{head} cached (took {_fmt(state.stages[s.name].get('elapsed_s', 0))} when it ran)")
            continue
        if s.name == "serve":
            write_report(ctx, hashes)  # the report is complete before the server blocks
        out = root / (s.name if s.out == "=" else s.out) if s.out else None
        # an interrupted run of the same config continues from its checkpoint (also under --from/--only)
        resume = bool(s.trains and out and state.was_started(s.name, h) and (out / LATEST_FILE).exists())
        if out and not resume:
            shutil.rmtree(out, ignore_errors=True)  # stale output of another config: start clean
        say(f"{head} {'resuming from its last checkpoint' if resume else 'running'} …")
        state.start(s.name, h)
        t0 = time.perf_counter()
        try:
            result = s.run(ctx, c, resume)
        except KeyboardInterrupt:
            state.fail(s.name, h, "interrupted", time.perf_counter() - t0)
            raise GptlabError(f"pipeline interrupted in stage '{s.name}'; resume with: {resume_cmd}") from None
        except Exception as e:  # noqa: BLE001 - any failure is reported with its stage and the way back
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            state.fail(s.name, h, reason, time.perf_counter() - t0)
            write_report(ctx, hashes)
            raise GptlabError(f"pipeline stage '{s.name}' failed: {reason} — fix it, then resume with: "
                              f"{resume_cmd} (finished stages are skipped)") from e
        elapsed = time.perf_counter() - t0
        state.finish(s.name, h, result, elapsed)
        ran += 1
        say(f"[{_bar(i, len(active))}] {i:>2}/{len(active)} {s.name:<15} done in {_fmt(elapsed)} "
            f"(pipeline {_fmt(time.perf_counter() - t_start)})")
    report = write_report(ctx, hashes)
    say(f"pipeline: {ran} stage(s) run, {len(active) - ran} cached, {_fmt(time.perf_counter() - t_start)} · "
        f"report: {report}")
    return {s.name: state.result(s.name) for s in active}


def _upstream(name: str) -> list[str]:
    seen: list[str] = []
    todo = list(stage(name).deps)
    while todo:
        d = todo.pop()
        if d not in seen:
            seen.append(d)
            todo += list(stage(d).deps)
    return [n for n in STAGE_NAMES if n in seen]


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that resumes this run: the same one without --from/--only."""
    args = list(sys.argv[1:] if argv is None else argv)
    keep, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("--from", "--only"):
            skip = True
            continue
        if a.startswith(("--from=", "--only=")):
            continue
        keep.append(a)
    return " ".join(["gptlab", *keep])
