"""SST-2 for the gpt1 recipe: seeded splits with their overlap measured, and the baselines (majority class,
TF-IDF + logistic regression) on the same labels.

GLUE's SST-2 training file holds the phrases of a treebank: most phrases are parts of longer ones, so a
random held-out phrase usually occurs inside a training phrase (~89% do). Two held-out sets are therefore
made: `heldout`, random phrases (the common split, and the one the issue's goals are stated on), and
`unseen`, whole sentences of which no part of three or more words is in training or pretraining (words and
two-word phrases stay: they occur in other sentences too).
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path

from gptlab.errors import GptlabError

Row = tuple[int, str]  # (label: 1 positive, 0 negative; phrase)
MIN_PART_WORDS = 3  # a training phrase this long that occurs inside an unseen sentence is removed


@dataclass
class Splits:
    train: list[Row]    # the labelled pool, shuffled: a label budget of n is its first n rows
    heldout: list[Row]  # random phrases
    unseen: list[Row]   # whole sentences with no part of ≥ MIN_PART_WORDS words trained on
    inside: float       # fraction of `heldout` that occurs verbatim inside a training phrase
    removed: int        # training phrases removed because they are parts of an unseen sentence


def read_sst2(path: Path) -> list[Row]:
    """label<TAB>sentence lines after a header -> rows (a malformed line is a one-line error)."""
    if not Path(path).is_file():
        raise GptlabError(f"{path}: not found (GLUE's SST-2 train.tsv: label<TAB>sentence with a header line)")
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()[1:], start=2):
        label, sep, text = line.partition("\t")
        if not sep or label not in ("0", "1") or not text.strip():
            raise GptlabError(f"{path}:{n}: expected label<TAB>sentence with label 0 or 1")
        rows.append((int(label), text.strip()))
    return rows


def _padded(texts: list[str]) -> str:
    return "\n " + " \n ".join(texts) + " \n"  # " phrase " matches whole words only


def make_splits(rows: list[Row], n_heldout: int, n_unseen: int, seed: int = 0, min_words: int = 15) -> Splits:
    rows = list(dict.fromkeys(rows))  # the file repeats a few phrases
    random.Random(seed).shuffle(rows)
    everything = _padded([t for _, t in rows])
    unseen: list[Row] = []
    for label, text in rows:  # a whole sentence: long, and inside no other phrase
        if len(unseen) == n_unseen:
            break
        if len(text.split()) >= min_words and everything.count(f" {text} ") == 1:
            unseen.append((label, text))
    if len(unseen) < n_unseen:
        raise GptlabError(f"only {len(unseen)} sentences of ≥ {min_words} words for the unseen split of {n_unseen}")
    parts = _padded([t for _, t in unseen])
    taken = set(unseen)
    pool = [r for r in rows if r not in taken]
    kept = [r for r in pool if len(r[1].split()) < MIN_PART_WORDS or f" {r[1]} " not in parts]
    heldout, train = kept[:n_heldout], kept[n_heldout:]
    if len(train) < 2:
        raise GptlabError(f"{len(rows)} phrases are too few for {n_heldout} held-out and {n_unseen} unseen")
    in_train = _padded([t for _, t in train])
    inside = sum(f" {t} " in in_train for _, t in heldout) / max(len(heldout), 1)
    return Splits(train, heldout, unseen, inside, len(pool) - len(kept))


def write_tsv(path: Path, rows: list[Row]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("label\tsentence\n" + "".join(f"{y}\t{t}\n" for y, t in rows), encoding="utf-8")
    return path


def majority(train: list[Row], test: list[Row]) -> float:
    """Accuracy of always answering the training set's most common label."""
    top = int(sum(y for y, _ in train) * 2 >= len(train))
    return sum(y == top for y, _ in test) / len(test)


def tfidf_accuracy(train: list[Row], tests: dict[str, list[Row]], seed: int = 0) -> dict[str, float]:
    """TF-IDF word 1-2-grams + logistic regression, its C chosen by 3-fold cross-validation on the training
    labels alone -> accuracy on each test set."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegressionCV
    except ImportError as e:
        raise GptlabError("the TF-IDF baseline needs scikit-learn: pip install 'gptlab[omni]' (or scikit-learn)") from e
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    x = vec.fit_transform([t for _, t in train])
    y = [label for label, _ in train]
    folds = min(3, min(y.count(0), y.count(1)))
    with warnings.catch_warnings():  # scikit-learn's notices about its own future defaults
        warnings.simplefilter("ignore", FutureWarning)
        clf = LogisticRegressionCV(Cs=[0.25, 1.0, 4.0, 16.0], cv=folds, max_iter=2000, random_state=seed).fit(x, y)
    return {name: float(clf.score(vec.transform([t for _, t in rows]), [label for label, _ in rows]))
            for name, rows in tests.items()}
