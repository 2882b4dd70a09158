"""Run directories that cannot be corrupted: one writer per run dir, a recorded config that changes only with
a checkpoint, resume that continues or refuses, and one-line errors for bad values, damaged files and failing
disks. One test per defect of issue 14, through the CLI where a user meets it."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab.cli import main as cli_main
from gptlab.data.prepare import prepare
from gptlab.data.shards import HEADER_BYTES
from gptlab.errors import GptlabError
from gptlab.run.lock import LOCK_FILE, RunLock
from gptlab.tokenizer import CharTokenizer

REPO = Path(__file__).resolve().parents[1]
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 40
TINY = ["--preset", "tiny", "--model.n_layer", "2", "--model.n_embd", "32", "--model.block_size", "32",
        "--train.block_size", "32", "--train.batch_size", "4", "--train.eval_iters", "2", "--train.dtype", "float32",
        "--train.warmup_iters", "2", "--train.log_interval", "1", "--train.lr", "3e-3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    (d / "corpus.txt").write_text(TEXT)
    prepare(str(d / "corpus.txt"), str(d / "char"), tokenizer="char", val_fraction=0.1, progress=False)
    return d / "char"


def _pretrain(data: Path, out: Path, *flags: str) -> int:
    return cli_main(["pretrain", "--data", str(data), "--out", str(out), *TINY, *flags])


def _one_error(capsys) -> str:
    """The command's stderr holds exactly one `error:` line, on a line of its own, and no traceback."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.split("\n") if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _losses(run: Path) -> list[tuple[int, float]]:
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


def _steps(run: Path) -> list[int]:
    return [step for step, _ in _losses(run)]


def _hold_lock(run: Path) -> subprocess.Popen:
    """Another process that holds `run`'s lock until killed."""
    p = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom gptlab.run.lock import RunLock\n"
                          "with RunLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)", str(run)],
                         stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert p.stdout.readline().strip() == "held"
    return p


# --- 1. one writer per run directory -------------------------------------------------------------------
def test_a_second_run_into_the_same_out_is_refused_and_the_first_is_intact(data, tmp_path, capsys):
    run = tmp_path / "r"
    first = subprocess.Popen([sys.executable, "-m", "gptlab.cli", "pretrain", "--data", str(data), "--out", str(run),
                              *TINY, "--train.max_iters", "40", "--train.seed", "1"], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not ((run / LOCK_FILE).exists() and (run / LOCK_FILE).read_text()) and time.time() < deadline:
        time.sleep(0.05)
    assert _pretrain(data, run, "--train.max_iters", "40", "--train.seed", "2") == 2
    msg = _one_error(capsys)
    assert f"in use by another gptlab run (PID {first.pid}: gptlab pretrain" in msg and "another --out" in msg
    assert first.wait(120) == 0, first.stderr.read()
    assert _steps(run) == list(range(1, 41))  # one trajectory, logged once
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == 1


@pytest.mark.parametrize("argv", [
    "finetune --from X --data X --out R", "sft --from X --data X --out R", "reward train --from X --data X --out R",
    "dpo --from X --data X --out R", "ppo --from X --reward X --prompts X --out R", "rlhf --from X --prompts X --out R",
    "compress quantize X --out R", "compress prune X --out R", "compress sparsegpt X --data X --out R",
    "prepare X --out R --tokenizer char", "pipeline --out R"])
def test_every_writing_command_takes_the_lock(argv, tmp_path, capsys):
    run = tmp_path / "R"
    holder = _hold_lock(run)
    try:
        assert cli_main(argv.replace("X", str(tmp_path / "nothing")).replace("R", str(run)).split()) == 2
        assert f"in use by another gptlab run (PID {holder.pid}" in _one_error(capsys)
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_does_not_block_and_its_leftovers_are_cleaned(data, tmp_path):
    run = tmp_path / "r"
    assert _pretrain(data, run, "--train.max_iters", "4") == 0
    holder = _hold_lock(run)
    # what a writer killed mid-write leaves: a temp copy of the weights, a temp config, a half checkpoint
    (run / ".model.safetensors.k2j4.tmp").write_bytes(b"\0" * 1000)
    (run / ".config.json.abcd.tmp").write_text("{")
    (run / "checkpoints" / ".step_0000008.tmp").mkdir()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert _pretrain(data, run, "--train.max_iters", "8", "--resume") == 0  # no wait, no manual unlock
    assert not list(run.glob(".*.tmp")) and not list((run / "checkpoints").glob(".*.tmp"))
    assert _steps(run) == list(range(1, 9))


def test_the_lock_is_reentrant_in_one_process_and_a_failed_start_leaves_nothing(data, tmp_path, capsys):
    run = tmp_path / "r"
    with RunLock(run), RunLock(run):  # the pipeline holds its out dir while its stages lock their own
        assert (run / LOCK_FILE).read_text().startswith(f"{os.getpid()} ")
    assert not run.exists()  # released, and the directory it created for nothing removed
    assert _pretrain(data, tmp_path / "new", "--preset", "gpt7") == 2
    assert "unknown preset" in _one_error(capsys) and not (tmp_path / "new").exists()


# --- 2. the recorded config changes only with a checkpoint; resume continues the same model --------------
def test_a_failed_resume_leaves_the_recorded_config_as_it_was(data, tmp_path, capsys):
    run = tmp_path / "r"
    assert _pretrain(data, run, "--train.max_iters", "6", "--train.checkpoint_interval", "3") == 0
    config = (run / "config.json").read_bytes()
    assert _pretrain(data, run, "--resume", "--train.max_iters", "12", "--train.lr", "1e6") == 2
    assert "NaN" in _one_error(capsys)
    assert (run / "config.json").read_bytes() == config
    assert _pretrain(data, run, "--resume", "--train.max_iters", "12", "--train.lr", "-1") == 2
    assert _one_error(capsys) == "error: train.lr must be ≥ 0, got -1.0"
    assert (run / "config.json").read_bytes() == config
    assert cli_main(["pretrain", "--data", str(data), "--out", str(run), "--resume", "--train.max_iters", "12"]) == 0
    saved = json.loads((run / "config.json").read_text())["train"]
    assert (saved["lr"], saved["max_iters"]) == (3e-3, 12)  # the run's lr, and the new length, recorded with step 12
    assert _steps(run) == list(range(1, 13))


def test_resume_refuses_a_different_model(data, tmp_path, capsys):
    run = tmp_path / "r"
    assert _pretrain(data, run, "--train.max_iters", "2") == 0
    base = ["pretrain", "--data", str(data), "--out", str(run), "--resume", "--train.max_iters", "3"]
    assert cli_main([*base, "--model.n_layer", "3"]) == 2
    assert "n_layer 2 → 3" in _one_error(capsys)
    assert cli_main([*base, "--preset", "small-4x128"]) == 2
    assert "drop them, or start a new run in another --out" in _one_error(capsys)
    assert _pretrain(data, run, "--resume", "--train.max_iters", "3") == 0  # the same flags again: fine


def test_the_nan_advice_is_true(data, tmp_path, capsys):
    nan = ["--train.lr", "1e6", "--train.max_iters", "30", "--train.log_interval", "5"]
    assert _pretrain(data, tmp_path / "fresh", *nan, "--train.checkpoint_interval", "100") == 2
    msg = _one_error(capsys)  # on a line of its own, not after the progress bar
    assert "no checkpoint was written yet" in msg and "--resume" not in msg
    assert _pretrain(data, tmp_path / "r", "--train.max_iters", "4") == 0
    assert _pretrain(data, tmp_path / "r", "--resume", *nan) == 2
    assert "the last good checkpoint is kept (step_0000004)" in _one_error(capsys)


# --- 3 and 4. one-line errors for damaged files, bad values, unwritable places ---------------------------
def test_damaged_run_files_are_one_line_errors(data, tmp_path, capsys):
    run = tmp_path / "r"
    assert _pretrain(data, run, "--train.max_iters", "4") == 0
    capsys.readouterr()
    good = json.loads((run / "config.json").read_text())
    for damage, msg in [({"model": {**good["model"], "n_layer": "two"}}, "model.n_layer: bad value 'two': expected an integer"),
                        ({"model": None}, "no model section"), ({"version": "1"}, "version must be a whole number")]:
        (run / "config.json").write_text(json.dumps({**good, **damage}))
        assert cli_main(["info", str(run)]) == 2
        assert msg in _one_error(capsys)
    (run / "config.json").write_text(json.dumps(good))
    state = run / "checkpoints" / "step_0000004" / "state.json"
    good_state = json.loads(state.read_text())
    for damage, msg in [({"step": "x"}, "is damaged"), ({"tokens": None}, "is damaged"),
                        ({"optimizer": None}, "holds no optimizer state")]:
        state.write_text(json.dumps({**good_state, **damage}))
        assert _pretrain(data, run, "--resume", "--train.max_iters", "6") == 2
        assert msg in _one_error(capsys)
    assert _steps(run) == [1, 2, 3, 4]


@pytest.mark.parametrize("flags, msg", [
    ("--train.lr -1", "train.lr must be ≥ 0, got -1.0"), ("--train.eps -1", "train.eps must be > 0"),
    ("--train.beta1 1.5", "train.beta1 must be in [0, 1), got 1.5"),
    ("--model.resid_pdrop 1.5", "model.resid_pdrop must be in [0, 1)"), ("--train.seed -1", "train.seed must be"),
    ("--model.init_std -1", "model.init_std must be > 0"), ("--model.d_ff -8", "model.d_ff must be ≥ 1"),
    ("--model.attention dense,strided --model.sparse_stride 0", "model.sparse_stride must be ≥ 1"),
    ("--train.weight_decay -1", "train.weight_decay must be ≥ 0"), ("--train.grad_clip -1", "train.grad_clip must be ≥ 0"),
    ("--train.eval_iters -1", "train.eval_iters must be ≥ 0"), ("--train.warmup_iters -5", "train.warmup_iters must be ≥ 0"),
    ("--model.attention local --model.local_window 0", "model.local_window must be ≥ 1"),
    ("--train.max_iters 2.5", "--train.max_iters: bad value '2.5': expected an integer"),
    ("--train.lr nan", "train.lr must be ≥ 0, got nan")])
def test_nonsense_values_are_refused_before_anything_is_written(data, tmp_path, capsys, flags, msg):
    assert _pretrain(data, tmp_path / "r", *flags.split()) == 2
    assert msg in _one_error(capsys)
    assert not (tmp_path / "r").exists()


def test_generate_refuses_zero_samples(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["generate", "nothing", "--num-samples", "0"])
    assert e.value.code == 2 and "--num-samples: must be ≥ 1, got 0" in capsys.readouterr().err


def test_pruning_flags_of_another_method_are_refused(data, tmp_path, capsys):
    assert _pretrain(data, tmp_path / "r", "--train.max_iters", "1") == 0
    capsys.readouterr()
    assert cli_main(["compress", "prune", str(tmp_path / "r"), "--out", str(tmp_path / "p"), "--n", "2", "--m", "4"]) == 2
    assert _one_error(capsys) == "error: --n --m do not apply to --method magnitude; did you mean --method nm?"
    assert not (tmp_path / "p").exists()


def test_out_that_cannot_be_a_run_directory(data, tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    assert _pretrain(data, tmp_path / "afile") == 2
    assert _one_error(capsys) == f"error: --out {tmp_path / 'afile'} is a file, not a directory"
    assert _pretrain(data, tmp_path / "afile" / "run") == 2
    assert _one_error(capsys) == f"error: cannot write {tmp_path / 'afile' / 'run'}: Not a directory"
    assert (tmp_path / "afile").read_text() == "mine"
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        assert _pretrain(data, tmp_path / "ro" / "run") == 2
        assert _one_error(capsys) == f"error: cannot write {tmp_path / 'ro' / 'run'}: Permission denied"


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one_and_resume_continues_exactly(data, tmp_path, capsys, monkeypatch):
    import gptlab.fileio

    flags = ["--train.max_iters", "12", "--train.checkpoint_interval", "4", "--train.decay_iters", "12"]
    assert _pretrain(data, tmp_path / "straight", *flags) == 0
    real, calls = gptlab.fileio.save_tensors, []

    def disk_full_at_step_8(tensors, path, metadata=None):
        calls.append(path)
        if "step_0000008" in str(path):  # as safetensors reports ENOSPC, converted by save_tensors
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(tensors, path, metadata)

    monkeypatch.setattr("gptlab.train.checkpoint.save_tensors", disk_full_at_step_8)
    run = tmp_path / "r"
    assert _pretrain(data, run, *flags) == 2
    assert _one_error(capsys) == (f"error: cannot write the step 8 checkpoint in {run}: No space left on device "
                                  "(the last checkpoint, step_0000004, is intact: free space, then --resume)")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000004"]  # the partial one removed
    monkeypatch.undo()
    assert _pretrain(data, run, "--resume") == 0
    assert _losses(run) == _losses(tmp_path / "straight")


def test_safetensors_io_errors_become_oserror(tmp_path):
    from gptlab.fileio import save_tensors

    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError) as e:  # safetensors raises its own SafetensorError for this
        save_tensors({"w": torch.zeros(2)}, tmp_path / "file" / "w.safetensors")
    assert e.value.errno == errno.ENOTDIR and e.value.filename == str(tmp_path / "file" / "w.safetensors")


def test_token_ids_outside_the_vocabulary_are_one_line_errors(data, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    vocab = json.loads((bad / "meta.json").read_text())["vocab_size"]
    shard = bad / "val_000000.bin"
    ids = np.memmap(shard, dtype=np.uint16, mode="r+", offset=HEADER_BYTES)
    ids[::7] = vocab + 3  # a hand-edited or corrupt shard
    ids.flush()
    del ids
    assert _pretrain(bad, tmp_path / "r", "--train.max_iters", "2") == 2
    assert f"hold token id {vocab + 3}, outside the vocabulary of {vocab}" in _one_error(capsys)


# --- 5 and 6. metrics.jsonl survives a kill during resume; resuming a finished run changes nothing -------
def test_a_kill_while_resume_trims_the_metrics_loses_nothing(data, tmp_path, monkeypatch):
    run = tmp_path / "r"
    assert _pretrain(data, run, "--train.max_iters", "8", "--train.checkpoint_interval", "4", "--train.keep_last", "3") == 0
    (run / "latest.json").write_text(json.dumps({"step": 4, "checkpoint": "step_0000004"}))  # steps 5-8 to trim
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')  # and a line cut short by the kill
    before = (run / "metrics.jsonl").read_bytes()
    real = Path.write_text

    def killed_halfway(self, text, *a, **kw):
        if "metrics" in self.name:
            real(self, text[: len(text) // 2])
            raise KeyboardInterrupt
        return real(self, text, *a, **kw)

    monkeypatch.setattr(Path, "write_text", killed_halfway)
    assert _pretrain(data, run, "--resume") == 130
    monkeypatch.undo()
    assert (run / "metrics.jsonl").read_bytes() == before and not list(run.glob(".*.tmp"))
    assert _pretrain(data, run, "--resume") == 0
    assert _steps(run) == list(range(1, 9))


def test_resuming_a_finished_run_says_so_and_changes_nothing(data, tmp_path, capsys):
    run = tmp_path / "r"
    assert _pretrain(data, run, "--train.max_iters", "4") == 0
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != LOCK_FILE}
    capsys.readouterr()
    assert _pretrain(data, run, "--resume", "--train.max_iters", "4") == 0
    assert f"{run} is finished (step 4 of 4); nothing to do" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != LOCK_FILE} == files


# --- 7. messages --------------------------------------------------------------------------------------
class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_pickle_that_runs_code_is_refused_without_torchs_hint(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 1,
                                                "n_positions": 8, "vocab_size": 10}))
    CharTokenizer.from_text("abcdefghi").save(tmp_path / "tok.json")  # 9 characters + <|endoftext|>
    torch.save({"wte.weight": torch.zeros(10, 8), "evil": _RunsCode()}, hf / "pytorch_model.bin")
    assert cli_main(["convert", "--from-hf", str(hf), str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tok.json")]) == 2
    msg = _one_error(capsys)
    assert "gptlab does not unpickle them" in msg and "weights_only" not in msg and "Re-running" not in msg
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists() and not (tmp_path / "out").exists()


def test_an_empty_text_in_a_finetuning_file_is_refused(tmp_path):
    from gptlab.finetune.data import load_examples

    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "fine", "label": 1}\n{"text": "  ", "label": 0}\n')
    with pytest.raises(GptlabError, match=r"line 2: field 'text' is empty; remove the row"):
        load_examples(f, "classification")


def test_sft_refuses_ambiguous_starts_before_writing(tmp_path):
    from gptlab.align.sft import sft

    rows = [{"prompt": "a", "response": "b"}]
    for kw, msg in [({"init_from": tmp_path / "run", "model_overrides": {"n_layer": 1}}, r"--model\.\* options shape a new"),
                    ({}, "give one of the two"), ({"init_from": tmp_path / "run", "preset_name": "tiny"}, "give one of the two"),
                    ({"preset_name": "tiny"}, "--preset needs --tokenizer")]:
        with pytest.raises(GptlabError, match=msg):
            sft(tmp_path / "out", rows, **kw)
        assert not (tmp_path / "out").exists()
