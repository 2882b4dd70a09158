"""`gptlab reproduce NAME` and `gptlab reproduce --list`."""

from __future__ import annotations

import argparse


def reproduce(name: str, out, scale: str = "cpu", quiet: bool = False, data=None):
    """Run the recipe `name` into `out` (its models cached there; one writer at a time) -> its report.md."""
    import importlib
    import inspect
    from pathlib import Path

    from gptlab.errors import GptlabError
    from gptlab.reproduce import RECIPES
    from gptlab.reproduce.report import write
    from gptlab.run.lock import RunLock
    from gptlab.runtime import describe_cpu

    if name not in RECIPES:
        raise GptlabError(f"unknown reproduction {name!r}; choose from {', '.join(RECIPES)} (gptlab reproduce --list)")
    recipe = importlib.import_module(RECIPES[name])
    if scale not in recipe.SCALES:
        raise GptlabError(f"reproduce {name}: --scale is one of {', '.join(recipe.SCALES)}")
    if data is not None and "source" not in inspect.signature(recipe.run).parameters:
        raise GptlabError(f"reproduce {name} reads no dataset file: drop --data")
    out = Path(out)
    with RunLock(out):
        _same_recipe(out, {"name": name, "scale": scale, **recipe.SCALES[scale]})
        rep = recipe.run(out, scale, quiet, **({"source": Path(data)} if data is not None else {}))
        rep.machine = describe_cpu()
        return write(out, rep)


def _same_recipe(out, settings: dict) -> None:
    """The models cached in `out` are reused only by the recipe and settings that made them."""
    import json

    from gptlab.errors import GptlabError
    from gptlab.fileio import atomic_write_json, read_json

    settings = json.loads(json.dumps(settings))  # tuples -> lists, as read back
    path = out / "recipe.json"
    if path.is_file() and read_json(path, "recipe settings") != settings:
        raise GptlabError(f"{out} holds the models of other settings (see {path}): give another --out, or remove it "
                          "to start over")
    atomic_write_json(path, settings)


def cmd_reproduce(a) -> None:
    from gptlab.reproduce import RECIPES

    if a.list or not a.name:
        import importlib

        for name, mod in RECIPES.items():
            m = importlib.import_module(mod)
            print(f"{name:12s} {m.SUMMARY}\n{'':12s} {m.PAPER}")
        return
    default = f"runs/reproduce/{a.name}" + ("" if a.scale == "cpu" else f"-{a.scale}")
    path = reproduce(a.name, a.out or default, a.scale, data=a.data)
    print(path.read_text(encoding="utf-8"))
    print(f"report: {path} (results.json and the figures beside it)")


def register(sub) -> None:
    p = sub.add_parser("reproduce", help="a paper's headline result at laptop scale, side by side with the paper "
                                         "(report.md, results.json, figures)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("name", nargs="?", help="the reproduction (see --list)")
    p.add_argument("--list", action="store_true", help="list the reproductions")
    p.add_argument("--out", help="folder for its models and report [default: runs/reproduce/NAME, NAME-gpu, NAME-smoke]")
    p.add_argument("--data", help="the dataset file of a recipe that reads one (gpt1: SST-2's train.tsv) "
                                  "[default: ../shared/data beside the repository]")
    p.add_argument("--scale", default="cpu", help="cpu: sized for 2 CPU cores; gpu: the papers' sizes")
    p.set_defaults(func=cmd_reproduce)
