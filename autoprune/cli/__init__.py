"""The ``autoprune`` command: parses arguments, calls the library, prints."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence

import optuna

from autoprune import __version__
from autoprune.cli import baselines, inspecting, searching
from autoprune.errors import AutopruneError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoprune", description=__doc__)
    parser.add_argument("--version", action="version", version=f"autoprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    searching.add_commands(sub)  # search, worker, status
    baselines.add_commands(sub)  # prune, sensitivity
    inspecting.add_commands(sub)  # front, report, pick, export
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial would drown the bar
    # Heartbeats, retries and metric names are "experimental" in Optuna since 2.x.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        return args.run(args)
    except AutopruneError as e:
        print(f"autoprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoprune: interrupted; completed trials are kept in the study", file=sys.stderr)
        return 130
