import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptlab.cli import main as cli_main
from gptlab.data.prepare import prepare
from gptlab.errors import GptlabError
from gptlab.model import GPT, preset
from gptlab.run import load_run
from gptlab.train.checkpoint import CheckpointManager
from gptlab.train.config import TrainConfig, resolve_train_config
from gptlab.train.optim import accum_at, lr_at, make_optimizer
from gptlab.pretrain import pretrain

REPO = Path(__file__).resolve().parents[1]
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 40


@pytest.fixture(scope="module")
def char_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    (d / "corpus.txt").write_text(TEXT)
    prepare(str(d / "corpus.txt"), str(d / "char"), tokenizer="char", val_fraction=0.1, progress=False)
    return d / "char"


TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)


def _train(data, out, steps, resume=False, **train):
    layer = {**dict(max_iters=steps, batch_size=4, block_size=32, dtype="float32", eval_interval=0, eval_iters=2,
                    log_interval=1, checkpoint_interval=10, warmup_iters=5, lr=3e-3, keep_last=2), **train}
    return pretrain(str(data), str(out), "tiny", "nanogpt", model_overrides=TINY, train_layers=(layer,),
                    resume=resume, quiet=True)


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


# --- schedule, batch warmup, parameter groups -----------------------------------------------------
def test_gpt1_schedule_warmup_then_cosine_to_zero():
    cfg = resolve_train_config("gpt1", {"max_iters": 10000})
    assert cfg.lr == 2.5e-4 and cfg.weight_decay == 0.01 and cfg.min_lr_ratio == 0.0
    assert lr_at(cfg, 0, 0) == pytest.approx(2.5e-4 / 2001)
    assert lr_at(cfg, 999, 0) == pytest.approx(2.5e-4 * 1000 / 2001)
    assert lr_at(cfg, 2000, 0) == pytest.approx(2.5e-4)
    assert lr_at(cfg, 6000, 0) == pytest.approx(2.5e-4 * 0.5)  # halfway through the cosine
    assert lr_at(cfg, 10000, 0) == pytest.approx(0.0)


def test_gpt3_schedule_in_tokens_to_ten_percent():
    cfg = resolve_train_config("gpt3", {"warmup_tokens": 1000, "decay_tokens": 11000})
    assert (cfg.beta2, cfg.eps, cfg.weight_decay, cfg.grad_clip) == (0.95, 1e-8, 0.1, 1.0)
    assert lr_at(cfg, 123, 499) == pytest.approx(6e-4 * 500 / 1001)  # steps do not matter, tokens do
    assert lr_at(cfg, 0, 6000) == pytest.approx(6e-5 + 0.5 * (6e-4 - 6e-5))
    assert lr_at(cfg, 0, 11000) == pytest.approx(6e-5)
    assert lr_at(cfg, 0, 10**9) == pytest.approx(6e-5)


def test_batch_size_warmup_grows_accumulation_linearly():
    cfg = TrainConfig(grad_accum=8, batch_warmup_tokens=1000, batch_start_tokens=100)
    per_micro = 100  # tokens per micro-step over all processes: full batch = 800 tokens
    assert accum_at(cfg, 0, per_micro) == 1
    assert accum_at(cfg, 500, per_micro) == math.ceil((100 + 700 * 0.5) / 100)  # 5
    assert accum_at(cfg, 999, per_micro) == 8
    assert accum_at(cfg, 5000, per_micro) == 8
    assert accum_at(TrainConfig(grad_accum=3), 0, per_micro) == 3  # no warmup configured


def test_no_weight_decay_on_biases_and_gains():
    m = GPT(preset("tiny", vocab_size=50))
    opt = make_optimizer(m, TrainConfig(weight_decay=0.1), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == m.num_params()  # the tied LM head is one tensor, optimised once


# --- resume, checkpoints, bad input ----------------------------------------------------------------
def test_resume_is_bit_exact(char_data, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))  # MFU's peak is measured: must not touch the RNG
    # the schedule is pinned to 20 steps, so the 10-step run is the first half of the 20-step one
    _train(char_data, tmp_path / "straight", 20, decay_iters=20)
    _train(char_data, tmp_path / "split", 10, decay_iters=20)
    _train(char_data, tmp_path / "split", 20, resume=True)
    straight, split = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert [s for s, _ in split] == list(range(1, 21))  # metrics.jsonl holds one trajectory
    assert straight == split  # exact equality, dropout included
    a = load_run(tmp_path / "straight").model.state_dict()
    b = load_run(tmp_path / "split").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir()) == ["step_0000010", "step_0000020"]
    assert (tmp_path / "split" / "loss.png").stat().st_size > 1000


def test_resuming_a_finished_run_keeps_its_checkpoint(char_data, tmp_path):
    _train(char_data, tmp_path / "r", 4)
    before = (tmp_path / "r" / "checkpoints" / "step_0000004" / "model.safetensors").read_bytes()
    _train(char_data, tmp_path / "r", 4, resume=True)
    assert (tmp_path / "r" / "checkpoints" / "step_0000004" / "model.safetensors").read_bytes() == before


def test_compiled_training_saves_plain_keys(char_data, tmp_path):
    _train(char_data, tmp_path / "c", 0, compile=True)  # no step: saving must not see torch.compile's wrapper
    from safetensors import safe_open

    with safe_open(str(tmp_path / "c" / "model.safetensors"), "pt") as f:
        assert "wte.weight" in f.keys() and not any(k.startswith("_orig_mod") for k in f.keys())


def test_resume_with_data_from_another_tokenizer_is_refused(char_data, tmp_path):
    _train(char_data, tmp_path / "r", 2)
    (tmp_path / "other.txt").write_text("completely different characters: 0123456789 xyz!" * 50)
    prepare(str(tmp_path / "other.txt"), str(tmp_path / "other"), tokenizer="char", progress=False)
    with pytest.raises(GptlabError, match="different tokenizer"):
        _train(tmp_path / "other", tmp_path / "r", 4, resume=True)


def test_yaml_config_values_are_typed_and_checked(char_data, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {char_data}\nout: {tmp_path / 'y'}\npreset: tiny\nmodel: {{n_layer: 1, block_size: 32}}\n"
                   "train: {lr: 6e-4, max_iters: 2e0, warmup_iters: 1, block_size: 32, batch_size: 2, eval_iters: 1}\n")
    assert cli_main(["pretrain", "--config", str(cfg)]) == 0
    assert json.loads((tmp_path / "y" / "config.json").read_text())["train"]["lr"] == 6e-4
    capsys.readouterr()
    for bad, match in [("model: {n_layers: 2}", "unknown model config keys"), ("train: {log_interval: 0}", "log_interval"),
                       ("train: {device: gpu0}", "device"), ("train: {lr: fast}", "train.lr")]:
        cfg.write_text(f"data: {char_data}\nout: {tmp_path / 'z'}\n{bad}\n")
        assert cli_main(["pretrain", "--config", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1


def test_existing_run_is_never_overwritten_without_resume(char_data, tmp_path):
    _train(char_data, tmp_path / "r", 2)
    with pytest.raises(GptlabError, match="already holds a run"):
        _train(char_data, tmp_path / "r", 2)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(char_data, tmp_path):
    _train(char_data, tmp_path / "r", 10)
    before = (tmp_path / "r" / "model.safetensors").read_bytes()
    with pytest.raises(GptlabError, match="NaN"):  # caught before a sample or eval would use NaN weights
        _train(char_data, tmp_path / "r", 30, resume=True, lr=1e6, log_interval=5, sample_interval=1, sample_tokens=4)
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == before
    assert CheckpointManager(tmp_path / "r").latest().name == "step_0000010"
    assert torch.isfinite(load_run(tmp_path / "r").model.wte.weight).all()


def test_corrupt_and_foreign_checkpoints_fail_clearly(char_data, tmp_path):
    _train(char_data, tmp_path / "r", 2)
    weights = tmp_path / "r" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(GptlabError, match="corrupt or truncated"):
        load_run(tmp_path / "r")
    from safetensors.torch import save_file

    save_file({"transformer.h.0.attn.c_attn.weight": torch.zeros(2, 2)}, str(weights))
    with pytest.raises(GptlabError, match="does not match this model"):
        load_run(tmp_path / "r")
    (tmp_path / "r" / "config.json").write_text("{not json")
    with pytest.raises(GptlabError, match="corrupt"):
        load_run(tmp_path / "r")


def test_vocab_mismatch_and_unknown_preset(char_data, tmp_path):
    with pytest.raises(GptlabError, match="vocab mismatch"):
        pretrain(str(char_data), str(tmp_path / "v"), "tiny", "nanogpt", model_overrides={"vocab_size": 5},
                 train_layers=({"max_iters": 1},), quiet=True)
    with pytest.raises(GptlabError, match="unknown preset"):
        pretrain(str(char_data), str(tmp_path / "p"), "gpt7", "nanogpt", quiet=True)


def test_cli_errors_are_one_line(char_data, tmp_path, capsys):
    assert cli_main(["pretrain", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert cli_main(["pretrain", "--data", str(char_data), "--out", str(tmp_path / "o"),
                     "--train.max_iters", "lots"]) == 2
    assert "--train.max_iters" in capsys.readouterr().err
    assert cli_main(["sample", str(tmp_path / "nothing")]) == 2


def test_gpt3_recipe_batch_warmup_in_a_real_run(char_data, tmp_path):
    _train(char_data, tmp_path / "g3", 12, grad_accum=4, batch_warmup_tokens=4 * 4 * 32 * 6, batch_start_tokens=128)
    recs = [json.loads(ln) for ln in (tmp_path / "g3" / "metrics.jsonl").read_text().splitlines()]
    sizes = [r["batch_tokens"] for r in recs if "batch_tokens" in r]
    assert sizes[0] == 128 and sizes[-1] == 4 * 4 * 32 and sizes == sorted(sizes)


def test_sample_and_info_commands(char_data, tmp_path, capsys):
    _train(char_data, tmp_path / "r", 3)
    assert cli_main(["sample", str(tmp_path / "r"), "--prompt", "First", "--max-new-tokens", "20"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("First") and len(out) >= 20
    assert cli_main(["info", str(tmp_path / "r"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["latest_checkpoint"] == "step_0000003" and info["tokenizer"]["kind"] == "char"


# --- several processes ------------------------------------------------------------------------------
def _same_run(x: Path, y: Path, steps: int = 8) -> None:
    """Two runs logged the same losses at steps 1..steps and ended with the same weights (to 1e-5)."""
    a, b = _losses(x), _losses(y)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, steps + 1))
    for (_, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, abs=1e-5)
    wa, wb = load_run(x).model.state_dict(), load_run(y).model.state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_with_same_global_batch(char_data, tmp_path, mode):
    common = ["--preset", "tiny", "--recipe", "nanogpt", "--model.n_layer", "2", "--model.n_embd", "32",
              "--model.block_size", "32", "--train.block_size", "32", "--train.max_iters", "8",
              "--train.dtype", "float32", "--train.eval_interval", "0", "--train.log_interval", "1",
              "--train.checkpoint_interval", "4", "--train.lr", "3e-3", "--data", str(char_data)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = [sys.executable, "-m", "gptlab", "pretrain", *common, "--out", str(tmp_path / "one"), "--train.batch_size", "4"]
    subprocess.run(one, check=True, capture_output=True, env=env, cwd=REPO, timeout=300)
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gptlab", "pretrain", *common, "--out", str(tmp_path / "two"), "--train.batch_size", "2",
           "--train.distributed", mode, "--train.sample_interval", "4", "--train.sample_tokens", "5"]
    proc = subprocess.run(two, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_run(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_fsdp_checkpoints_are_sharded_and_resume_on_another_process_count(char_data, tmp_path):
    """2 processes under FSDP write torch.distributed.checkpoint shards (no full optimizer state gathered);
    one process resumes them: the same losses and weights as an uninterrupted 2-process run."""
    common = ["--preset", "tiny", "--recipe", "nanogpt", "--model.n_layer", "2", "--model.n_embd", "32",
              "--model.block_size", "32", "--train.block_size", "32", "--train.dtype", "float32",
              "--train.eval_interval", "0", "--train.log_interval", "1", "--train.checkpoint_interval", "4",
              "--train.lr", "3e-3", "--train.decay_iters", "8", "--data", str(char_data)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gptlab",
           "pretrain", *common, "--train.batch_size", "2", "--train.distributed", "fsdp"]
    for out, steps in (("full", "8"), ("cut", "4")):
        proc = subprocess.run([*two, "--out", str(tmp_path / out), "--train.max_iters", steps], capture_output=True,
                              text=True, env=env, cwd=REPO, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "cut" / "checkpoints" / "step_0000004"
    assert (ckpt / "dcp" / ".metadata").is_file() and len(list((ckpt / "dcp").glob("*.distcp"))) == 2
    assert not (ckpt / "model.safetensors").exists()  # the weights are in the shards; the run's copy is whole
    one = [sys.executable, "-m", "gptlab", "pretrain", "--data", str(char_data), "--out", str(tmp_path / "cut"),
           "--resume", "--train.max_iters", "8", "--train.batch_size", "4"]  # one process, the same global batch
    proc = subprocess.run(one, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_run(tmp_path / "full", tmp_path / "cut")


def test_an_optimizer_step_invalidates_the_generators_packed_weights():
    # the fused AdamW kernel writes weights without bumping their version; the Generator's prepacked CPU
    # weights are keyed on it, so without the optimizer's hook a policy trained between rollouts (PPO)
    # would keep sampling from its old weights
    from gptlab.generate import Generator, SamplingParams
    from gptlab.tokenizer.char import CharTokenizer

    torch.manual_seed(0)
    tok = CharTokenizer("abcdefgh")
    model = GPT(preset("tiny", vocab_size=tok.vocab_size, block_size=32))
    opt = make_optimizer(model, TrainConfig(lr=0.5), "cpu")
    gen = Generator(model, tok)
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    before = gen.generate(["ab"], greedy)[0].token_ids
    model.train()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    v = model.wte.weight._version
    opt.step()
    assert model.wte.weight._version > v
    after = gen.generate(["ab"], greedy)[0].token_ids
    x = torch.tensor([tok.encode("ab")])
    with torch.no_grad():
        want = model(x)[0][0, -1].argmax().item()  # the plain forward with the new weights
    assert after[0] == want and after != before


def _leveldb_log_records(buf: bytes, block: int = 32768):
    """Records of a W&B transaction log: a 7-byte ':W&B' header, then LevelDB's log format (32 KiB blocks,
    7-byte record headers: crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    assert buf[:4] == b":W&B"
    pos, part = 7, b""
    while pos + 7 <= len(buf):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        n, kind = int.from_bytes(buf[pos + 4:pos + 6], "little"), buf[pos + 6]
        if n == 0 and kind == 0:
            break
        data, pos = buf[pos + 7:pos + 7 + n], pos + 7 + n
        part = data if kind in (1, 2) else part + data
        if kind in (1, 4):
            yield part


def test_trackers_mirror_metrics_jsonl_offline_and_resume_one_run(char_data, tmp_path, monkeypatch):
    """--train.log_to tensorboard,wandb,trackio: W&B offline and trackio's local database get the values
    metrics.jsonl holds, and a resumed run continues the same tracker runs."""
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network, no account
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is imported
    pytest.importorskip("wandb")
    pytest.importorskip("trackio")
    monkeypatch.setenv("GPTLAB_PROJECT", "gptlab-test")
    out = tmp_path / "run"
    _train(char_data, out, 6, log_to="tensorboard,wandb,trackio", checkpoint_interval=3)
    _train(char_data, out, 10, resume=True, log_to="wandb,trackio")
    want = {s: loss for s, loss in _losses(out)}
    assert sorted(want) == list(range(1, 11))
    ids = json.loads((out / "trackers.json").read_text())
    # W&B: the history records of the offline run files (protobuf Records in LevelDB's log format)
    from wandb.proto import wandb_internal_pb2

    files = sorted(out.glob(f"wandb/offline-run-*-{ids['wandb']}/run-{ids['wandb']}.wandb"))
    assert len(files) == 2  # two processes, one W&B run id
    got = {}
    for f in files:
        for rec in _leveldb_log_records(f.read_bytes()):
            pb = wandb_internal_pb2.Record()
            pb.ParseFromString(rec)
            if pb.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in pb.history.item}
                if "loss" in items:
                    got[items["_step"]] = items["loss"]
    assert got == pytest.approx(want)
    # trackio: its local SQLite database
    import sqlite3

    db = next((tmp_path / "trackio").glob("gptlab-test*.db"))
    rows = sqlite3.connect(db).execute("SELECT step, metrics FROM metrics WHERE run_name = ?", (ids["trackio"],))
    seen = {s: json.loads(m)["loss"] for s, m in rows if "loss" in json.loads(m)}
    assert seen == pytest.approx(want)
    assert any((out / "tensorboard").iterdir())
    with pytest.raises(GptlabError, match="unknown logger 'mlflow'"):
        TrainConfig(log_to="wandb,mlflow")


def test_training_without_matplotlib_skips_only_the_pictures(char_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.setattr("gptlab.plot._told", False)
    _train(char_data, tmp_path / "r", 3)
    assert [s for s, _ in _losses(tmp_path / "r")] == [1, 2, 3]
    assert not (tmp_path / "r" / "loss.png").exists() and "gptlab[plots]" in capsys.readouterr().out
