"""Command line: parse -> validate -> call. No logic lives here.

Each command is a module with ``add_parser(subparsers)`` that registers its arguments and sets
``func`` to a callable taking the parsed namespace and returning an exit status. Heavy imports (torch,
transformers) happen inside the command functions so ``posttrain --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command name -> module that registers it
COMMANDS = {
    "sft": "posttrain.commands.sft_cmd",
    "grpo": "posttrain.commands.grpo_cmd",
    "rm": "posttrain.commands.rm_cmd",  # registers eval-rm too
    "dpo": "posttrain.commands.dpo_cmd",
    "verify": "posttrain.commands.verify_cmd",
    "eval": "posttrain.commands.eval_cmd",
    "export": "posttrain.commands.export_cmd",
    "chat": "posttrain.commands.chat_cmd",
    "generate": "posttrain.commands.generate_cmd",
    "run": "posttrain.commands.run_cmd",
    "quickstart": "posttrain.commands.quickstart_cmd",
    "recipes": "posttrain.commands.recipes_cmd",
    "config": "posttrain.commands.config_cmd",
}
# the commands that compute with torch: their thread count is chosen from the free cores first (posttrain.threads)
COMPUTE = ("sft", "grpo", "rm", "eval-rm", "dpo", "eval", "export", "chat", "generate", "run", "quickstart")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posttrain",
        description="LLM post-training from one YAML recipe: sft, grpo, eval, export, and a pipeline that chains them.",
    )
    from posttrain import __version__

    parser.add_argument("--version", action="version", version=f"posttrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def quiet_library_noise() -> None:
    """Silence two messages that say nothing to a posttrain user: bitsandbytes' notice that an optional hub kernel
    for 4-bit matmuls on AVX512-BF16 CPUs is not installed (its own CPU code runs instead, same results), and
    PEFT's use of a transformers attribute that transformers 5 renamed."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    from posttrain.errors import UserError

    quiet_library_noise()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if args.command in COMPUTE:
            from posttrain.threads import apply

            apply()
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that went away (| head) shows here, not as a traceback at exit
        return status
    except BrokenPipeError:
        return closed_stdout()
    except UserError as exc:
        print(f"posttrain {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a write no command guards itself (fileops.writing): a full disk is still named
        from posttrain.fileops import no_space_message

        if no_space_message(exc) is None:
            raise
        print(f"posttrain {args.command}: error: {no_space_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"posttrain {args.command}: interrupted", file=sys.stderr)
        return 130


def closed_stdout() -> int:
    """The reader of our output closed it (``posttrain verify --file x | head -1``): stop quietly, as Unix tools do,
    with status 141 (128 + SIGPIPE). stdout goes to /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a file (replaced in tests)
        pass
    return 141


if __name__ == "__main__":
    sys.exit(main())
