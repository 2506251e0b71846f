"""`infer-recipes`: argument parsing and printing only; the work happens behind the public API.

One module per command family, each with its own subparsers (`register`): generate.py (generate, chat, run,
info, recipes), evaluate.py (eval), quantize.py (quantize, tune), serve.py (serve), bench.py (bench, profile, plan);
common.py the flags they share."""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from . import bench, evaluate, generate, quantize, serve
from .common import _set_threads


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infer-recipes",
                                     description="Llama-family inference with measured optimizations.")
    sub = parser.add_subparsers(dest="command", required=True)
    for family in (generate, evaluate, quantize, serve, bench):
        family.register(sub)
    return parser


def _join_world(args) -> bool:
    """Under torchrun: joins the world (before the command sets its threads, so --threads wins over the
    per-rank default) and says whether this rank only follows rank 0, running model steps, never the command."""
    from .. import distributed
    from ..device import resolve_device

    if not distributed.launched():
        return False
    world = distributed.context(resolve_device(getattr(args, "device", None) or "auto").type)
    return world.rank != 0


def _follow(args) -> NoReturn:
    from .. import distributed
    from ..engine.llm import run_worker

    if getattr(args, "threads", None) is not None:
        _set_threads(args)
    run_worker(distributed.current())  # ends the process when rank 0 stops the workers


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..errors import InferRecipesError

    try:
        if _join_world(args):
            return _follow(args)
        return args.func(args)
    except InferRecipesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
