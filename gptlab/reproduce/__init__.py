"""`gptlab reproduce NAME`: a paper's headline result, reproduced at laptop scale on real data, side by side
with what the paper says.

Each recipe is a module here with `PAPER` (the citation), `SUMMARY` (one line) and
`run(out: Path, scale: str, quiet: bool[, source: Path]) -> Reproduction` (`source`: the dataset file, for
recipes that read one): it drives the existing stages (no training loop of
its own), caches the models it trains under `out/`, and states each claim as "the paper says / we measured /
holds at this scale?" (`gptlab.reproduce.report`). A claim that does not hold is reported as not holding, with
the reason.
"""

from __future__ import annotations

RECIPES = {  # name -> module (imported when run)
    "gpt1": "gptlab.reproduce.gpt1",
    "gpt2": "gptlab.reproduce.gpt2",
    "gpt3": "gptlab.reproduce.gpt3",
    "gpt4o": "gptlab.reproduce.gpt4o",
    "instructgpt": "gptlab.reproduce.instructgpt",
    "sparsegpt": "gptlab.reproduce.sparsegpt",
}
