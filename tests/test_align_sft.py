"""SFT (InstructGPT step 1): loss masks by hand, packing, the data layouts, bad input, a short run + chat load."""

import json
from pathlib import Path

import pytest
import torch

from gptlab.align.data import load_prompts, load_sft_examples
from gptlab.align.sft import IGNORE, Sample, collate, encode_sft, pack_samples
from gptlab.chat.template import ensure_chat_tokens
from gptlab.errors import GptlabError
from gptlab.model import GPT, preset
from gptlab.run import load_run, write_run_config
from gptlab.tokenizer import CharTokenizer
from gptlab.run.format import MODEL_FILE, save_model

ALPHABET = " abcdefghijklmnopqrstuvwxyz\n"  # ' ' = 0, a = 1 ... z = 26, '\n' = 27, <|endoftext|> = 28
NL = 27
SYS, USR, AST, END = 29, 30, 31, 32  # chat tokens appended after <|endoftext|>
X = IGNORE
FAST = dict(dtype="float32", peak_flops=1e12, log_interval=1, eval_interval=0, eval_iters=2, batch_size=4)


def _c(s: str) -> list[int]:
    return [ALPHABET.index(ch) for ch in s]


def _tok():
    return ensure_chat_tokens(CharTokenizer(ALPHABET))


def pretrained_run(d: Path, block_size: int = 64) -> Path:
    torch.manual_seed(1)
    tok = CharTokenizer(ALPHABET)
    cfg = preset("tiny", vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=block_size)
    write_run_config(d, cfg, tok, stage="pretrain")
    save_model(GPT(cfg), d / MODEL_FILE)
    return d


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


# --- loss masks, by hand ----------------------------------------------------------------------------
def test_single_turn_mask_trains_the_response_and_its_end_only():
    s, tr = encode_sft(_tok(), [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], 64)
    # rendered: <|user|> h i <|end|> \n <|assistant|> y o <|end|> \n
    assert s.x == [USR, *_c("hi"), END, NL, AST, *_c("yo"), END] and not tr
    # <|assistant|> predicts y, y predicts o, o predicts <|end|>; <|end|> -> \n and the prompt predict nothing
    assert s.y == [X, X, X, X, X, *_c("yo"), END, X]


def test_multi_turn_mask_trains_every_assistant_turn():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "bc"}, {"role": "user", "content": "d"},
            {"role": "assistant", "content": "e"}]
    s, _ = encode_sft(_tok(), msgs, 64)
    assert s.x == [SYS, *_c("s"), END, NL, USR, *_c("a"), END, NL, AST, *_c("bc"), END, NL,
                   USR, *_c("d"), END, NL, AST, *_c("e"), END]
    assert s.y == [X, X, X, X, X, X, X, X,  # system and first user turn predict nothing
                   *_c("bc"), END, X, X,    # first reply + its <|end|>; <|end|> -> \n and \n -> <|user|> masked
                   X, X, X, X,              # second user turn (d, <|end|>, \n, <|assistant|> not trained)
                   *_c("e"), END, X]        # second reply
    assert len(s.x) == len(s.y)


def test_truncation_keeps_the_start():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "bcdefghij"}]
    s, tr = encode_sft(_tok(), msgs, 8)
    assert tr and s.x == [USR, *_c("a"), END, NL, AST, *_c("bcd")]
    assert s.y == [X, X, X, X, *_c("bcde")]


def test_packing_keeps_each_examples_targets_and_fills_windows():
    a = Sample([1, 2, 3], [X, 2, 3])
    b = Sample([4, 5], [X, 9])
    c = Sample([6, 7, 8, 9, 10], [X, X, 8, 9, 10])
    packed = pack_samples([a, b, c], 8)
    # first-fit decreasing: c (5) opens window 1, a (3) fits beside it, b (2) opens window 2
    assert packed == [Sample([6, 7, 8, 9, 10, 1, 2, 3], [X, X, 8, 9, 10, X, 2, 3]), Sample([4, 5], [X, 9])]
    # no target crosses an example boundary: the first token of each example is never predicted by the previous
    batch = collate(packed, pad=0)
    assert batch.x.shape == (2, 8) and batch.y[1].tolist() == [X, 9, X, X, X, X, X, X]
    # the same examples packed or not give the same number of trained tokens
    assert int((batch.y != X).sum()) == sum(t != X for s in (a, b, c) for t in s.y)


# --- data layouts -----------------------------------------------------------------------------------
def test_the_three_layouts_and_alpaca_with_input(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [
        {"prompt": "p", "response": "r"},
        {"prompt": "p2", "response": "r2", "system": "sys"},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
                      {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]},
        {"instruction": "Translate", "input": "", "output": "out"},
        {"instruction": "Translate", "input": "bonjour", "output": "hello"},
    ])
    ex = load_sft_examples(p)
    U, A = "user", "assistant"
    assert ex[0] == [{"role": U, "content": "p"}, {"role": A, "content": "r"}]
    assert ex[1][0] == {"role": "system", "content": "sys"}
    assert [m["content"] for m in ex[2]] == ["u", "a", "u2", "a2"]
    assert ex[3] == [{"role": U, "content": "Translate"}, {"role": A, "content": "out"}]
    assert ex[4] == [{"role": U, "content": "Translate\n\nbonjour"}, {"role": A, "content": "hello"}]
    # CSV with a header and JSON lists load through the same reader
    (tmp_path / "d.csv").write_text("prompt,response\nhello,world\n")
    assert load_sft_examples(tmp_path / "d.csv") == [[{"role": U, "content": "hello"}, {"role": A, "content": "world"}]]
    # any SFT file also gives PPO prompts (the conversation before the last reply)
    assert load_prompts(p)[2] == [{"role": U, "content": "u"}, {"role": A, "content": "a"}, {"role": U, "content": "u2"}]


def test_shared_instruction_data_loads(shared_data):
    seed = load_sft_examples(shared_data / "instructions" / "seed_tasks.jsonl")
    assert len(seed) == 175 and all(c[-1]["role"] == "assistant" and c[-1]["content"] for c in seed)
    zh = shared_data / "instructions" / "alpaca_zh_2k.json"
    with pytest.raises(GptlabError, match=r"alpaca_zh_2k.json:item \d+: empty response"):
        load_sft_examples(zh)  # the shared file really has one empty output
    ex = load_sft_examples(zh, skip_empty=True)
    assert len(ex) == 1999


@pytest.mark.parametrize("content, match", [
    ("", "no examples"),
    ('{"prompt": "a"}\n', "line 1: missing field 'response'"),
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "  "}\n', "line 2: empty response"),
    ('{"prompt": "a", "response": "b"}\n{"question": "x"}\n', "line 2: unknown layout"),
    ('{"messages": [{"role": "bot", "content": "x"}]}\n', "line 1: message 0 has unknown role"),
    ('{"messages": [{"role": "user", "content": "x"}]}\n', "line 1: the conversation has no assistant turn"),
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff"}\n', "invalid UTF-8 at line 2"),
])
def test_bad_input_is_a_one_line_error_naming_file_and_line(tmp_path, content, match):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(GptlabError, match=match) as e:
        load_sft_examples(p)
    assert "bad.jsonl" in str(e.value) and "\n" not in str(e.value)


# --- a short run through the CLI ------------------------------------------------------------------
def test_sft_run_lowers_the_assistant_loss_and_chat_loads_it(tmp_path):
    from gptlab.cli import main

    pre = pretrained_run(tmp_path / "pre")
    rows = [{"prompt": f"say {w}", "response": f"{w} {w}"} for w in ["cat", "dog", "owl", "bee", "ant", "yak"] * 4]
    data = _jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "sft"
    assert main(["sft", "--from", str(pre), "--data", str(data), "--out", str(out), "--pack", "--val-fraction", "0.2",
                 "--train.max_iters", "30", "--train.lr", "3e-3", "--train.warmup_iters", "0",
                 *[f"--train.{k}={v}" for k, v in FAST.items()]]) == 0
    run = load_run(out)
    assert run.config["stage"] == "sft" and run.config["sft"]["pack"] is True
    assert "<|assistant|>" in run.tokenizer.special_tokens and run.model.cfg.vocab_size == 33
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < 0.6 * losses[0]
    # the run dir is what `gptlab chat` loads
    from gptlab.generate import Generator
    from gptlab.chat.template import render_ids

    gen = Generator(run.model, run.tokenizer)
    ids, _ = render_ids(run.tokenizer, [{"role": "user", "content": "say cat"}])
    assert gen is not None and ids[-1] == AST
    # resuming a finished run is refused without --resume, accepted with it
    assert main(["sft", "--from", str(pre), "--data", str(data), "--out", str(out)]) == 2
