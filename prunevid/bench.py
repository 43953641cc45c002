"""Benchmarks (`prunevid bench ...`). Subcommands are registered in `add_commands`."""

from __future__ import annotations

import argparse


def add_commands(parser: argparse.ArgumentParser) -> None:
    parser.add_subparsers(dest="bench", required=True)
