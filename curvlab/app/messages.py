"""How the commands print an error: once prefixed with the command's name."""

from __future__ import annotations

import argparse
import sys


def flag(name: str) -> str:
    """A configuration field as the command line spells its option: ``stat_decay`` → ``--stat-decay``."""
    return "--" + name.replace("_", "-")


def print_error(parser: argparse.ArgumentParser, message: object, usage: bool = False) -> None:
    """``PROG: error: MESSAGE`` on stderr (after the usage line with ``usage``); the library's
    messages often name the command ("curvlab train: …") or the library ("curvlab: …"), which is
    not repeated."""
    if usage:
        parser.print_usage(sys.stderr)
    text = str(message).removeprefix(f"{parser.prog}: ").removeprefix("curvlab: ")
    print(f"{parser.prog}: error: {text}", file=sys.stderr)
