"""``posttrain config show sft|grpo|eval|pipeline|all [--markdown]``: the configuration reference."""

from __future__ import annotations

import argparse

from posttrain import config_docs

EPILOG = """\
Each key is printed by its dotted path (train.lr, grpo.vllm.mode; a pipeline's stage keys as stages[eval].limit)
with its type, its default and what it does. docs/config.md is this reference for every kind:
  posttrain config show --markdown all > docs/config.md
"""


def add_parser(sub) -> None:
    p = sub.add_parser("config", help="the configuration reference: every key with its type, default and meaning",
                       description="The configuration reference, generated from the typed config models.")
    actions = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="print every key of a recipe, the eval settings or a pipeline file",
                              description="Print every key of one kind of configuration with its type, default "
                                          "and description.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("kind", choices=[*config_docs.KINDS, "all"],
                      help="sft or grpo (a recipe), eval (posttrain eval's settings), pipeline (posttrain run's "
                           "file), or all")
    show.add_argument("--markdown", action="store_true", help="markdown tables (docs/config.md) instead of text")
    show.set_defaults(func=run)


def run(args) -> int:
    kinds = list(config_docs.KINDS) if args.kind == "all" else [args.kind]
    if args.markdown:
        print(config_docs.markdown(kinds), end="")
    else:
        print("\n".join(config_docs.text(kind) for kind in kinds), end="")
    return 0
