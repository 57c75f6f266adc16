"""``posttrain recipes [NAME]``: the recipes that ship with posttrain, or the path of one.

The recipes are package data, so an installed wheel has no ``recipes/`` folder to look in: this lists them by
name (what ``posttrain sft NAME``, ``posttrain run NAME`` accept), and prints a file's path for the tools that need
a path, ``accelerate launch --config_file "$(posttrain recipes accelerate/ddp_8gpu)"``, or to start a recipe of
your own, ``cp "$(posttrain recipes tiny/sft)" my_sft.yaml``.
"""

from __future__ import annotations

import argparse

from posttrain import recipes
from posttrain.errors import UserError

WIDTH = 110  # a listed recipe's line: its name and the start of its header comment


def add_parser(sub) -> None:
    p = sub.add_parser("recipes", help="list the shipped recipes, or print the path of one",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help="a shipped recipe's name (tiny/sft): print its file's path")
    p.set_defaults(func=run)


def summary(name: str) -> str:
    """The first sentence of a recipe's header comment, as far as its first line goes (every shipped recipe
    starts with what it does)."""
    first = (recipes.ROOT / f"{name}.yaml").read_text().splitlines()[0]
    return first.lstrip("#").strip().split(". ", 1)[0]


def run(args) -> int:
    if args.name:
        path = recipes.find(args.name)
        if path is None:
            raise UserError(f"no shipped recipe is named {args.name!r}; the names: {', '.join(recipes.names())}")
        print(path)
        return 0
    print(f"shipped recipes ({recipes.ROOT}); run one by name, e.g. posttrain sft tiny/sft")
    names = recipes.names()
    pad = max(map(len, names)) + 2
    for name in names:
        line = f"  {name:<{pad}}{summary(name)}"
        print(line if len(line) <= WIDTH else line[:WIDTH - 3] + "...")
    return 0
