"""Offline lmms-eval tasks shipped with PruneVid (package data), for `--include_path`.

    lmms-eval --include_path "$(prunevid-eval-tasks-path)" --tasks prunevid_synth_qa ...

`prunevid_synth_qa` (generate_until, exact match) and `prunevid_synth_mc` (multiple choice,
log-likelihood; run it with `--force_simple`) ask the seven `prunevid.synthetic` question
families about a dozen tiny held-out videos: no download, known answers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

TASK_NAMES = ("prunevid_synth_qa", "prunevid_synth_mc")


def tasks_path() -> Path:
    """The folder to pass to lmms-eval's `--include_path`."""
    return Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    """Print the folder (the `prunevid-eval-tasks-path` command)."""
    parser = argparse.ArgumentParser(prog="prunevid-eval-tasks-path", description=tasks_path.__doc__)
    parser.parse_args(argv)
    print(tasks_path())
    return 0


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register `eval-tasks-path` on a CLI's subcommands (its handler takes the parsed args)."""
    sub = commands.add_parser("eval-tasks-path", help="print the folder of the offline lmms-eval tasks")
    sub.set_defaults(run=lambda _args: print(tasks_path()))
