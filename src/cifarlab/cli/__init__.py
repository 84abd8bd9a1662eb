"""The ``cifarlab`` command: a thin layer of argparse over the library, one module per command.

Each command module has ``register(subparsers)``; adding a command is one module and one entry in
:data:`COMMANDS`. No library module imports this package.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import CifarlabError
from . import (augment_preview, calibrate, compare, evaluate, explore, export, import_keras, info, lr_find, predict,
               report, sweep, train, visualize)
from .args import EXIT_ERROR, EXIT_INTERRUPTED

COMMANDS = [train, evaluate, calibrate, visualize, report, predict, explore, export, import_keras, info, lr_find,
            augment_preview, compare, sweep]


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__

    parser = argparse.ArgumentParser(prog="cifarlab", description="Define a CNN, train it on CIFAR-10, CIFAR-100 "
                                     "or your own photos, evaluate it, and see what it learned.")
    parser.add_argument("--version", action="version", version=f"cifarlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except CifarlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except ValueError as e:  # recipe validation and similar user-value errors
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:  # a full disk, an unwritable folder: say so and which file, no traceback
        print(f"error: {e.filename}: {e.strerror}" if e.filename and e.strerror else f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
