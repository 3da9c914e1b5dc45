"""The ``autoprune`` command: parses arguments, calls the library, prints."""

from __future__ import annotations

import argparse
import logging
import os
import select
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
    except BrokenPipeError:
        if not _stdout_gone():
            raise
        # The reader of the output went away (`autoprune front | head`): end quietly, as
        # `cat` does, with stdout on devnull so that the interpreter's last flush cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command that SIGPIPE ended


def _stdout_gone() -> bool:
    """Whether standard output is a pipe that nobody reads any more (on POSIX: polling it
    reports an error)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), no file descriptor
        return False
