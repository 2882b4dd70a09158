"""`gptlab reproduce NAME` and `gptlab reproduce --list`."""

from __future__ import annotations

import argparse


def reproduce(name: str, out, scale: str = "cpu", quiet: bool = False):
    """Run the recipe `name` into `out` (its models cached there; one writer at a time) -> its report.md."""
    import importlib
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
    out = Path(out)
    with RunLock(out):
        rep = recipe.run(out, scale, quiet)
        rep.machine = describe_cpu()
        return write(out, rep)


def cmd_reproduce(a) -> None:
    from gptlab.reproduce import RECIPES

    if a.list or not a.name:
        import importlib

        for name, mod in RECIPES.items():
            m = importlib.import_module(mod)
            print(f"{name:10s} {m.SUMMARY}\n{'':10s} {m.PAPER}")
        return
    path = reproduce(a.name, a.out or f"runs/reproduce/{a.name}", a.scale)
    print(path.read_text(encoding="utf-8"))
    print(f"report: {path} (results.json and the figures beside it)")


def register(sub) -> None:
    p = sub.add_parser("reproduce", help="a paper's headline result at laptop scale, side by side with the paper "
                                         "(report.md, results.json, figures)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("name", nargs="?", help="the reproduction (see --list)")
    p.add_argument("--list", action="store_true", help="list the reproductions")
    p.add_argument("--out", help="folder for its models and report [default: runs/reproduce/NAME]")
    p.add_argument("--scale", default="cpu", help="cpu: sized for 2 CPU cores; gpu: the papers' sizes")
    p.set_defaults(func=cmd_reproduce)
