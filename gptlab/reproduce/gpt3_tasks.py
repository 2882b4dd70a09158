"""GPT-3's synthetic tasks (§3.9.1 arithmetic, §3.9.2 word scrambling), written as "input = output" lines:

- symbols:  a random punctuation or space character between each letter  (s.u!c c;e-s/s = success)
- cycle:    the letters rotated                                           (ccesssu = success)
- anagram:  all but the first and last letters shuffled (GPT-3's A1)      (sucsecs = success)
- reverse:  the word spelled backwards                                    (sseccus = success)
- add2:     two 2-digit numbers                                           (48 plus 76 = 124)

An episode is K demonstrations of one task and a query, one per line, with no task description: the model can
only tell the task from the demonstrations, so K = 0 leaves it to guess. Words are the corpus's frequent words;
a held-out fifth of them (and of the number pairs) never appears in a pretraining episode and is all that
demonstrations and queries use at evaluation.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

TASKS = ("symbols", "cycle", "anagram", "reverse", "add2")
_SYMBOLS = " .,;:!?-'/"


def scramble(task: str, x: str, rnd: random.Random) -> str:
    """The task's input for the answer `x` (a word; for add2, "a b")."""
    if task == "symbols":
        return "".join(c + rnd.choice(_SYMBOLS) for c in x[:-1]) + x[-1]
    if task == "cycle":
        r = rnd.randrange(1, len(x))
        return x[r:] + x[:r]
    if task == "anagram":
        mid = list(x[1:-1])
        for _ in range(8):  # a different word where the letters allow one
            rnd.shuffle(mid)
            if "".join(mid) != x[1:-1]:
                break
        return x[0] + "".join(mid) + x[-1]
    if task == "reverse":
        return x[::-1]
    if task == "add2":
        a, b = x.split()
        return f"{a} plus {b}"
    raise ValueError(task)


def answer(task: str, x: str) -> str:
    if task == "add2":
        a, b = x.split()
        return str(int(a) + int(b))
    return x


@dataclass
class Vocab:
    """Words and number pairs, split once into those pretraining may show and those kept for evaluation."""
    train: dict[str, list[str]]
    heldout: dict[str, list[str]]


def split_vocab(text: str, n_words: int, heldout: float = 0.2, seed: int = 0) -> Vocab:
    """The `n_words` most frequent lowercase words of 4-9 letters in `text` and all pairs of 2-digit numbers,
    each shuffled and split (`heldout` of them for evaluation only)."""
    counts = Counter(w for w in re.findall(r"[a-z]+", text) if 4 <= len(w) <= 9)
    words = sorted(w for w, _ in counts.most_common(n_words))
    pairs = [f"{a} {b}" for a in range(10, 100) for b in range(10, 100)]
    rnd = random.Random(seed)
    train, held = {}, {}
    for task in TASKS:
        pool = list(pairs if task == "add2" else words)
        rnd.shuffle(pool) if task in ("symbols", "add2") else None  # one word split shared by the word tasks
        train[task], held[task] = pool[int(heldout * len(pool)):], pool[:int(heldout * len(pool))]
    for task in ("cycle", "anagram", "reverse"):
        train[task], held[task] = train["symbols"], held["symbols"]
    return Vocab(train, held)


def line(task: str, x: str, rnd: random.Random) -> str:
    return f"{scramble(task, x, rnd)} = {answer(task, x)}"


def episode(task: str, pool: list[str], k: int, rnd: random.Random) -> str:
    """k demonstrations and a query of `task`, answered, drawn without repeats from `pool`."""
    return "\n".join(line(task, x, rnd) for x in rnd.sample(pool, k + 1)) + "\n"


def episodes(vocab: Vocab, n_chars: int, max_k: int, seed: int = 1) -> list[str]:
    """Pretraining episodes from the training words and pairs, about `n_chars` characters in all; the task
    and K (0 … max_k) uniform at random."""
    rnd, out, total = random.Random(seed), [], 0
    while total < n_chars:
        task = rnd.choice(TASKS)
        out.append(episode(task, vocab.train[task], rnd.randint(0, max_k), rnd))
        total += len(out[-1])
    return out


def eval_rows(vocab: Vocab, task: str, n_test: int, seed: int = 2) -> tuple[list[dict], list[dict]]:
    """(test rows, demonstration rows) of `task` from its held-out words, disjoint: {"input", "output"}."""
    rnd = random.Random(seed)
    held = list(vocab.heldout[task])
    rnd.shuffle(held)
    rows = [{"input": scramble(task, x, rnd), "output": answer(task, x)} for x in held]
    return rows[:n_test], rows[n_test:]
