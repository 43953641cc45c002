"""`prunevid bench speed | accuracy`: the subcommands, each with its own options and runner."""

from __future__ import annotations

import argparse

from . import accuracy, speed


def add_commands(parser: argparse.ArgumentParser) -> None:
    """Register the subcommands under `parser` (the `bench` command of `prunevid.cli`)."""
    commands = parser.add_subparsers(dest="bench", required=True)
    timed = commands.add_parser("speed", help="prefill / TTFT / decode / memory: PruneVid vs stock vs FastV")
    speed.add_arguments(timed)
    timed.set_defaults(run=speed.run)

    known_answers = commands.add_parser("accuracy", help="known-answer accuracy on synthetic videos, offline")
    accuracy.add_arguments(known_answers)
    known_answers.set_defaults(run=accuracy.run)
