"""The ``autoprune`` command: parses arguments, calls the library, prints."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import optuna
import pandas as pd
import torch
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from autoprune import __version__
from autoprune.allocation import ALLOCATIONS
from autoprune.errors import AutopruneError, SpecError
from autoprune.heuristics import baseline
from autoprune.masks import prunable_layers
from autoprune.report import pareto_front, write_report
from autoprune.search import STUDY_ATTR, load_study, open_study, optimize
from autoprune.sensitivity import analyze
from autoprune.spec import load_spec, parse_duration
from autoprune.tasks import load_task

DEFAULT_STORAGE = "sqlite:///autoprune.db"
_STATE_WORDS = {TrialState.PRUNED: "stopped early"}


class _Progress:
    """An Optuna callback drawing a tqdm bar: trials done/total, s/trial, ETA, front size."""

    # study.best_trials copies every trial, so a long study recounts its front at most this
    # often (seconds) instead of after every trial.
    FRONT_EVERY = 2.0

    def __init__(self, total: int | None, *, disable: bool = False):
        self.bar = tqdm(
            total=total,
            unit="trial",
            disable=disable,
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
            "[{elapsed}<{remaining}, {rate_inv_fmt}{postfix}]",
        )
        self.front, self.failed, self.stopped = 0, 0, 0
        self._counted = -math.inf

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.bar.update(1)
        now = time.monotonic()
        if now - self._counted >= self.FRONT_EVERY or self.bar.n == self.bar.total:
            self.front = len(study.best_trials)
            self._counted = now
        self.failed += trial.state == TrialState.FAIL
        self.stopped += trial.state == TrialState.PRUNED
        self.bar.set_postfix(front=self.front, failed=self.failed, stopped=self.stopped)


def _search(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    trials = args.trials if args.trials is not None else spec.trials
    timeout = parse_duration(args.timeout) if args.timeout is not None else spec.timeout
    storage = args.storage or spec.storage
    study_name = args.study_name or spec.name
    task = spec.finetune.apply(load_task(spec.task, seed=spec.seed))
    # Opened (and the task checked) before the bar is drawn: bad input gives one line.
    study = open_study(
        task,
        space=spec.space,
        storage=storage,
        study_name=study_name,
        seed=spec.seed,
        sampler=spec.sampler,
        warm_start=spec.warm_start,
    )
    dense = study.user_attrs[STUDY_ATTR]["dense"]
    print(
        f"dense {task.name}: val accuracy {dense['accuracy']:.4f}, test accuracy "
        f"{dense.get('test_accuracy', float('nan')):.4f}, "
        f"{int(dense['nonzero_params'])} prunable weights",
        flush=True,
    )
    progress = _Progress(trials, disable=args.quiet)
    try:
        optimize(
            study,
            task,
            n_trials=trials,
            timeout=timeout,
            callbacks=[progress],
            constraints=spec.constraints,
            early_stop=spec.early_stop,
        )
    finally:
        progress.bar.close()
    _print_counts(study)
    print(_front_text(pareto_front(study)))
    out = write_report(study, args.report or f"{study_name}.html")
    print(f"study {study_name!r} in {storage}")
    print(f"report: {out.resolve()}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    task = spec.finetune.apply(load_task(spec.task, seed=spec.seed))
    layers = prunable_layers(task.model, spec.space.include, spec.space.exclude)
    seed = spec.seed if args.seed is None else args.seed
    result = baseline(task, args.policy, args.sparsity, seed=seed, layers=layers)
    m = result.metrics
    print(
        f"{args.policy} at {args.sparsity:g} on {task.name}, {task.finetune_epochs} fine-tuning "
        f"epochs: sparsity {m['sparsity']:.4f}, val accuracy {m['accuracy']:.4f}, test "
        f"accuracy {m.get('test_accuracy', float('nan')):.4f}, "
        f"{int(m['nonzero_params'])} of {int(m['total_params'])} weights left"
    )
    for layer, value in result.layer_sparsity.items():
        print(f"  {layer}: sparsity {value:.4f}")
    if args.out:
        torch.save(result.model.state_dict(), args.out)
        print(f"pruned model's state dict: {Path(args.out).resolve()}")
    return 0


def _sensitivity(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    storage = args.storage or spec.storage
    study_name = args.study_name or spec.name
    task = spec.finetune.apply(load_task(spec.task, seed=spec.seed))
    study = open_study(
        task,
        space=spec.space,
        storage=storage,
        study_name=study_name,
        seed=spec.seed,
        sampler=spec.sampler,
        warm_start=spec.warm_start,
    )
    curves, enqueued = analyze(study, task, spec.warm_start.sparsities)
    table = pd.DataFrame(
        {layer: {s: a for s, a in curve} for layer, curve in curves.items()}
    ).T.rename(columns=lambda s: f"s={s:g}")
    print("val accuracy with one layer pruned (magnitude, no fine-tuning):")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"stored in study {study_name!r} in {storage}; {enqueued} trials enqueued from it")
    return 0


def _front(args: argparse.Namespace) -> int:
    if args.csv and args.json:
        raise SpecError("give --csv or --json, not both")
    study = load_study(args.storage, args.study_name)
    front = pareto_front(study)
    if args.csv:
        front.to_csv(args.csv, index=False)
        print(f"wrote {len(front)} front trials to {args.csv}")
    elif args.json:
        front.to_json(args.json, orient="records", indent=2, double_precision=15)
        print(f"wrote {len(front)} front trials to {args.json}")
    else:
        print(_front_text(front))
    return 0


def _report(args: argparse.Namespace) -> int:
    study = load_study(args.storage, args.study_name)
    out = write_report(study, args.out or f"{study.study_name}.html")
    print(f"report: {Path(out).resolve()}")
    return 0


def _print_counts(study: optuna.Study) -> None:
    # A PRUNED trial is one that autoprune.stopping stopped early: say so in our words.
    states = pd.Series(
        [_STATE_WORDS.get(t.state, t.state.name.lower()) for t in study.get_trials(deepcopy=False)]
    )
    counts = ", ".join(f"{n} {state}" for state, n in states.value_counts().items())
    print(f"study {study.study_name!r}: {len(states)} trials ({counts})")


def _front_text(front: pd.DataFrame) -> str:
    if front.empty:
        return "the Pareto front is empty (no trial has completed)"
    shown = front.rename(columns=lambda c: c.replace("sparsity:", "s:"))
    return f"Pareto front ({len(front)} trials):\n" + shown.to_string(
        index=False, float_format=lambda v: f"{v:.4f}", na_rep="-"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoprune", description=__doc__)
    parser.add_argument("--version", action="version", version=f"autoprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("search", help="run (or resume) a search from a TOML study spec")
    p.add_argument("spec", help="study spec, e.g. studies/digits_cnn.toml")
    p.add_argument("--storage", help=f"database URL (default: the spec's, else {DEFAULT_STORAGE})")
    p.add_argument("--study-name", help="study name (default: the spec's)")
    p.add_argument("--trials", type=_positive_int, help="trials to add in this run")
    p.add_argument("--timeout", help="stop starting trials after this long: 90, 30m, 8h")
    p.add_argument("--report", help="HTML report path (default: STUDY_NAME.html)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_search)

    p = sub.add_parser("prune", help="one-shot baseline: prune by a heuristic and fine-tune")
    p.add_argument("spec", help="study spec (task, layers, fine-tuning recipe, seed)")
    p.add_argument("--policy", required=True, choices=list(ALLOCATIONS), help="allocation")
    p.add_argument("--sparsity", required=True, type=_sparsity, help="target, e.g. 0.9")
    p.add_argument("--seed", type=int, help="fine-tuning seed (default: the spec's)")
    p.add_argument("--out", help="save the pruned model's state dict here")
    p.set_defaults(run=_prune)

    p = sub.add_parser("sensitivity", help="per-layer accuracy-vs-sparsity curves, stored")
    p.add_argument("spec", help="study spec; the study is created if it does not exist")
    p.add_argument("--storage", help=f"database URL (default: the spec's, else {DEFAULT_STORAGE})")
    p.add_argument("--study-name", help="study name (default: the spec's)")
    p.set_defaults(run=_sensitivity)

    for name, helptext in (
        ("front", "print or export the Pareto front"),
        ("report", "write the HTML report"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument(
            "--storage", default=DEFAULT_STORAGE, help=f"database URL (default: {DEFAULT_STORAGE})"
        )
        p.add_argument("--study-name", help="needed when the storage holds several studies")
        if name == "front":
            p.add_argument("--csv", help="write the front to this CSV file")
            p.add_argument("--json", help="write the front to this JSON file")
            p.set_defaults(run=_front)
        else:
            p.add_argument("--out", help="HTML path (default: STUDY_NAME.html)")
            p.set_defaults(run=_report)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial would drown the bar
    try:
        return args.run(args)
    except AutopruneError as e:
        print(f"autoprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoprune: interrupted; completed trials are kept in the study", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
