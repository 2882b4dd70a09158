"""Instruction, comparison and evaluation data made from the plays themselves, deterministically.

No human demonstrations or preferences can ship with gptlab, so the default pipeline makes them from the
corpus (any text in play layout: a speaker line `Romeo.` or `ROMEO:` then the speech, blank-line separated):

- **SFT demonstrations**: an instruction asking a named character to speak on a topic ("Speak as Hamlet
  about death."), answered by a real speech of that character that mentions the topic.
- **Comparisons**: for held-out (character, topic) prompts, 4 candidate speeches (the character's own on
  the topic, another character's on the topic, two off-topic) ranked by `judge`, a transparent rule:
  mentions of the topic, a finished sentence, a sensible length. Ties are dropped, never broken at random.
- **PPO prompts**: further held-out (character, topic) instructions.
- **A cloze task** for zero/few-shot evaluation: the first half of a speech, choose its true second half
  among 4 (GPT-3's StoryCloze/HellaSwag format), read by `gptlab.evaluate` as a multiple-choice task.

Everything is a function of (corpus, seed), so re-running gives identical files.
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from gptlab.errors import GptlabError

TOPICS = ("love", "death", "king", "night", "war", "honour", "heaven", "blood", "crown", "father", "sword",
          "heart", "fortune", "sleep", "time", "grief", "joy", "fear", "gold", "queen", "son", "eyes", "world",
          "friend", "peace", "god", "sun", "woman", "tears", "soul")
TEMPLATES = ("Speak as {speaker} about {topic}.", "What might {speaker} say of {topic}?",
             "In the voice of {speaker}, tell me about {topic}.", "{speaker}, give us a few lines on {topic}.")
_SPEAKER = re.compile(r"^([A-Z][A-Za-z'\- ]{1,28}|\d [A-Z][A-Za-z ]{1,20})[.:]$")
_STAGE = re.compile(r"\[[^\]]*\]")


@dataclass(frozen=True)
class Speech:
    speaker: str
    text: str


def parse_speeches(text: str, min_words: int = 8, max_words: int = 60) -> list[Speech]:
    """Speeches of `min_words`..`max_words` words in play layout; stage directions in [brackets] removed."""
    out: list[Speech] = []
    for block in re.split(r"\n\s*\n", _STAGE.sub("", text.replace("\r\n", "\n"))):
        lines = [ln.strip() for ln in block.strip().split("\n") if ln.strip()]
        if len(lines) < 2 or not _SPEAKER.match(lines[0]):
            continue
        speaker = " ".join(w.capitalize() if w.isupper() else w for w in lines[0][:-1].split())
        body = "\n".join(lines[1:])
        if min_words <= len(body.split()) <= max_words and not _SPEAKER.match(lines[1]):
            out.append(Speech(speaker, body))
    return out


def _mentions(topic: str, text: str) -> int:
    return len(re.findall(rf"\b{re.escape(topic)}s?\b", text, flags=re.IGNORECASE))


def topic_of(prompt: str) -> str:
    """The topic of one of our instructions: its last word (every template ends with it)."""
    words = re.findall(r"[A-Za-z]+", prompt)
    if not words:
        raise GptlabError(f"not a pipeline instruction (no topic word): {prompt!r}")
    return words[-1].lower()


def judge(prompt: str, response: str) -> float:
    """The programmatic labeller: 2 for mentioning the topic, +0.5 per further mention (at most 2),
    +0.5 for ending on a finished sentence, −1 when shorter than 5 or longer than 80 words."""
    n = _mentions(topic_of(prompt), response)
    score = (2.0 if n else 0.0) + 0.5 * min(max(n - 1, 0), 2)
    score += 0.5 if response.rstrip().endswith((".", "!", "?")) else 0.0
    words = len(response.split())
    return score - (1.0 if words < 5 or words > 80 else 0.0)


def judge_rewards(prompts: list[str], responses: list[str]) -> list[float]:
    """`judge` in the `reward_fn(prompts, responses)` shape PPO accepts (a reward without a reward model)."""
    return [judge(p, r) for p, r in zip(prompts, responses)]


def make_datasets(texts: list[str], out_dir: str | Path, *, seed: int = 0, n_sft: int = 2000, n_pref: int = 600,
                  n_prompts: int = 200, n_cloze: int = 200, min_speeches: int = 8, max_words: int = 40) -> dict:
    """Write sft.jsonl, preferences.jsonl, prompts.jsonl and cloze.jsonl to `out_dir`; return their counts.
    `max_words` bounds the speeches used: short demonstrations teach a small model to end its turn."""
    speeches = [s for t in texts for s in parse_speeches(t, max_words=max_words)]
    by_speaker: dict[str, list[Speech]] = defaultdict(list)
    for s in speeches:
        by_speaker[s.speaker].append(s)
    # ≥ 4 letters: some Gutenberg plays abbreviate speakers ("Osw.", "Cor.") and those make poor prompts
    speakers = sorted(k for k, v in by_speaker.items() if len(v) >= min_speeches and len(k) >= 4)
    if len(speakers) < 2:
        raise GptlabError(f"the corpus has {len(speeches)} speeches by {len(speakers)} characters with ≥ {min_speeches} "
                          "speeches; the synthetic alignment data needs a corpus in play layout (a `Name.` or "
                          "`NAME:` line, then the speech) — or give sft/reward/ppo data files in the config")
    rng = random.Random(seed)
    # every (speaker, topic) with on-topic speeches, in a seeded order; disjoint slices per use
    pairs = [(sp, t) for sp in speakers for t in TOPICS if any(_mentions(t, s.text) for s in by_speaker[sp])]
    rng.shuffle(pairs)
    n_pairs = len(pairs)
    sft_pairs, pref_pairs = pairs[: n_pairs // 2], pairs[n_pairs // 2: n_pairs * 5 // 6]
    prompt_pairs = pairs[n_pairs * 5 // 6:]
    topical = {t: [bool(_mentions(t, s.text)) for s in speeches] for t in TOPICS}
    on_topic = {t: [s for s, m in zip(speeches, topical[t]) if m] for t in TOPICS}
    off_topic = {t: [s for s, m in zip(speeches, topical[t]) if not m] for t in TOPICS}

    def instruction(sp: str, t: str) -> str:
        return rng.choice(TEMPLATES).format(speaker=sp, topic=t)

    sft = []
    for i in range(n_sft):
        sp, t = sft_pairs[i % len(sft_pairs)]
        own = [s for s in by_speaker[sp] if _mentions(t, s.text)]
        sft.append({"prompt": instruction(sp, t), "response": rng.choice(own).text})

    prefs = []
    for i in range(n_pref * 2):  # some prompts lose candidates to ties; stop at n_pref
        if len(prefs) == n_pref:
            break
        sp, t = pref_pairs[i % len(pref_pairs)]
        prompt = instruction(sp, t)
        own = [s for s in by_speaker[sp] if _mentions(t, s.text)]
        others = [s for s in on_topic[t] if s.speaker != sp] or own
        off = off_topic[t]
        cands = [rng.choice(own).text, rng.choice(others).text, rng.choice(off).text, rng.choice(off).text]
        scored: dict[float, str] = {}
        for c in cands:  # keep the first response of each judge score: a strict ranking
            scored.setdefault(judge(prompt, c), c)
        if len(scored) >= 2:
            prefs.append({"prompt": prompt, "responses": [scored[k] for k in sorted(scored, reverse=True)]})

    prompts = [{"prompt": instruction(sp, t)} for sp, t in (prompt_pairs * (n_prompts // max(len(prompt_pairs), 1) + 1))
               [:n_prompts]]

    cloze = []
    pool = [s for s in speeches if len(s.text.split()) >= 16]
    for s in rng.sample(pool, min(n_cloze, len(pool))):
        w = s.text.split()
        half = len(w) // 2
        endings = [" ".join(w[half:])]
        while len(endings) < 4:
            o = rng.choice(pool).text.split()
            e = " ".join(o[len(o) // 2:])
            if e not in endings:
                endings.append(e)
        order = list(range(4))
        rng.shuffle(order)
        cloze.append({"context": " ".join(w[:half]), "choices": [endings[j] for j in order],
                      "answer": order.index(0)})

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("sft", sft), ("preferences", prefs), ("prompts", prompts), ("cloze", cloze)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"speeches": len(speeches), "characters": len(speakers), "pairs": n_pairs, "sft": len(sft),
            "preferences": len(prefs), "prompts": len(prompts), "cloze": len(cloze)}


CLOZE_TASK = {"name": "cloze", "type": "multiple_choice", "template": "{context}", "choices": "{choices}",
              "target": "{answer}", "data": {"test": "cloze.jsonl", "test_size": 100, "split_seed": 0}}
