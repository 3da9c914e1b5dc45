"""The ``autoprune`` command: parses arguments, calls the library, prints."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import optuna
import pandas as pd
import torch
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from autoprune import __version__
from autoprune.allocation import ALLOCATIONS
from autoprune.artifacts import FrontWeights, resolve_dir
from autoprune.dashboard import watch_report, write_report
from autoprune.errors import AutopruneError, SpecError
from autoprune.export import export, pick, record_task_ref
from autoprune.heuristics import baseline
from autoprune.masks import prunable_layers
from autoprune.parallel import run_workers
from autoprune.report import pareto_front
from autoprune.search import STUDY_ATTR, load_study, open_study
from autoprune.sensitivity import analyze
from autoprune.spec import load_spec, parse_duration
from autoprune.status import StudyStatus, study_status
from autoprune.storages import GRACE_FACTOR, HEARTBEAT
from autoprune.tasks import load_task
from autoprune.trial_metrics import metric_names, study_total_params, trial_metrics
from autoprune.worker import join_study, run_worker

DEFAULT_STORAGE = "sqlite:///autoprune.db"
_STATE_WORDS = {TrialState.PRUNED: "stopped early"}


class _Progress:
    """Draws the whole study's progress on a tqdm bar, across all its workers: trials done
    of the target, ETA, and complete / failed / stopped, front size and hypervolume.

    Called as an Optuna callback after each trial, or with :meth:`refresh` by a parent that
    watches worker processes.
    """

    # The front and hypervolume copy every trial, so a long study recounts them at most this
    # often (seconds) instead of after every trial.
    EVERY = 2.0

    def __init__(self, total: int | None, *, initial: int = 0, disable: bool = False):
        self.bar = tqdm(
            total=total,
            initial=initial,
            unit="trial",
            disable=disable,
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
            "[{elapsed}<{remaining}, {rate_inv_fmt}{postfix}]",
        )
        self._counted = -math.inf

    def __call__(self, study: optuna.Study, trial: FrozenTrial | None = None) -> None:
        self.refresh(study)

    def refresh(self, study: optuna.Study, *, force: bool = False) -> None:
        """Recount the study (at most every ``EVERY`` seconds unless ``force``)."""
        now = time.monotonic()
        if self.bar.disable or (not force and now - self._counted < self.EVERY):
            return
        self._counted = now
        status = study_status(study)
        self.bar.update(max(0, status.done - self.bar.n))
        hv = "-" if status.hypervolume is None else f"{status.hypervolume:.3f}"
        states = status.states
        self.bar.set_postfix_str(
            f"complete={states['complete']}, failed={states['failed']}, "
            f"stopped={states['stopped']}, front={status.front_size}, hv={hv}"
        )

    def close(self, study: optuna.Study) -> None:
        self.refresh(study, force=True)
        self.bar.close()


def _search(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    spec = dataclasses.replace(
        spec,
        trials=args.trials or spec.trials,
        timeout=parse_duration(args.timeout) if args.timeout is not None else spec.timeout,
        storage=args.storage or spec.storage,
        study_name=args.study_name or spec.name,
    )
    task = spec.finetune.apply(load_task(spec.task, seed=spec.seed))
    # Opened (and the task checked) before the bar is drawn: bad input gives one line. The
    # study exists before any worker starts.
    study = open_study(
        task,
        space=spec.space,
        storage=spec.storage,
        study_name=spec.name,
        seed=spec.seed,
        sampler=spec.sampler,
        warm_start=spec.warm_start,
        budget=spec.trials,
        spec=spec.to_dict(),
        heartbeat=args.heartbeat,
        objectives=spec.objectives,
        latency=spec.latency,
    )
    weights_dir = resolve_dir(spec.storage, spec.artifacts)
    record_task_ref(study, spec.task)  # so that `autoprune export` can rebuild the model
    dense = study.user_attrs[STUDY_ATTR]["dense"]
    print(
        f"dense {task.name}: val accuracy {dense['accuracy']:.4f}, test accuracy "
        f"{dense.get('test_accuracy', float('nan')):.4f}, "
        f"{int(dense['nonzero_params'])} prunable weights"
        + "".join(
            f", {name} {dense[name]:.6g}"
            for name in (study.metric_names or [])[1:]
            if name != "nonzero_params" and name in dense
        ),
        flush=True,
    )
    progress = _Progress(spec.trials, initial=study_status(study).done, disable=args.quiet)
    codes = [0]
    try:
        if args.workers == 1:
            summary = run_worker(
                study,
                task,
                target=spec.trials,
                timeout=spec.timeout,
                callbacks=[progress],
                artifacts=spec.artifacts,
                constraints=spec.constraints,
                early_stop=spec.early_stop,
            )
            lines = [str(summary)]
        else:
            lines, codes = run_workers(
                study,
                spec.storage,
                args.workers,
                target=spec.trials,
                timeout=spec.timeout,
                heartbeat=args.heartbeat,
                on_poll=progress.refresh,
            )
    finally:
        progress.close(study)
    print("\n".join(lines))
    _print_counts(study)
    print(_front_text(pareto_front(study)))
    out = write_report(study, args.report or f"{spec.name}.html")
    print(f"study {spec.name!r} in {spec.storage}")
    if weights_dir is not None:
        print(f"front weights: {_relative(weights_dir)}")
    print(f"report: {out.resolve()}")
    if any(codes):
        print(f"autoprune: {sum(c != 0 for c in codes)} workers ended abnormally", file=sys.stderr)
    return 1 if any(codes) else 0


def _worker(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    study, spec, task = join_study(args.storage, args.study_name, heartbeat=args.heartbeat)
    target = args.trials or spec.trials
    timeout = parse_duration(args.timeout) if args.timeout is not None else None
    progress = _Progress(target, initial=study_status(study).done, disable=args.quiet)
    try:
        summary = run_worker(
            study,
            task,
            target=target,
            timeout=timeout,
            callbacks=[progress],
            artifacts=spec.artifacts,
            constraints=spec.constraints,
            early_stop=spec.early_stop,
        )
    finally:
        progress.close(study)
    print(summary, flush=True)
    _print_counts(study)
    return 0


def _status(args: argparse.Namespace) -> int:
    status = study_status(load_study(args.storage, args.study_name))
    print(_status_text(status))
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
        budget=spec.trials,
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
    studies = [load_study(args.storage, name) for name in args.study_name or [None]]
    out = Path(args.out or "-vs-".join(s.study_name for s in studies) + ".html")
    if args.watch is None:
        write_report(studies, out)
        print(f"report: {out.resolve()}")
        return 0
    print(f"report: {out.resolve()} (rewritten every {args.watch:g} s; Ctrl-C stops)", flush=True)
    try:
        watch_report(studies, out, every=args.watch)
    except KeyboardInterrupt:
        print("stopped watching", file=sys.stderr)
    return 0


def _pick(args: argparse.Namespace) -> int:
    study = load_study(args.storage, args.study_name)
    trial = pick(
        study,
        min_accuracy=args.min_accuracy,
        max_params=args.max_params,
        max_size=args.max_size,
        knee=args.knee,
        by=args.by,
    )
    metrics = trial_metrics(trial, metric_names(study), total_params=study_total_params(study))
    policy = trial.user_attrs.get("policy", {})
    numbers = ", ".join(f"{k} {v:.6g}" for k, v in metrics.items())
    weights = FrontWeights.find(study)
    stored = weights is not None and weights.has(trial)
    stored_text = "weights stored" if stored else "no stored weights (export replays it)"
    print(
        f"trial {trial.number}: {numbers}; criterion {policy.get('criterion')}, scope "
        f"{policy.get('scope')}, rule {policy.get('rule')}; {stored_text}"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    study = load_study(args.storage, args.study_name)
    done = export(study, args.trial, args.out, task_ref=args.task, artifact_dir=args.artifact_dir)
    m = done.metrics
    how = "its stored weights" if done.source == "artifact" else "a replay (no stored weights)"
    print(
        f"exported trial {done.trial} from {how} to {done.directory}: val accuracy "
        f"{m['accuracy']:.4f}, test accuracy {_number(m['test_accuracy'])}, "
        f"{m['nonzero_params']} "
        f"nonzero weights, {m['bytes']} bytes (dense {m['dense_bytes']}), {m['macs']} MACs"
    )
    return 0


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _print_counts(study: optuna.Study) -> None:
    # A PRUNED trial is one that autoprune.stopping stopped early: say so in our words.
    states = pd.Series(
        [_STATE_WORDS.get(t.state, t.state.name.lower()) for t in study.get_trials(deepcopy=False)]
    )
    counts = ", ".join(f"{n} {state}" for state, n in states.value_counts().items())
    print(f"study {study.study_name!r}: {len(states)} trials ({counts})")


def _status_text(status: StudyStatus) -> str:
    states = ", ".join(f"{n} {word}" for word, n in status.states.items())
    target = f" of a target of {status.target}" if status.target else ""
    lines = [f"study {status.name!r}: {status.counted} trials{target} ({states})"]
    pace = status.trials_per_hour
    lines.append(
        "pace: "
        + (
            "no trial finished in the last hour"
            if pace is None
            else f"{pace:.1f} trials/hour over the last hour"
        )
    )
    hv = "" if status.hypervolume is None else f", hypervolume {status.hypervolume:.4f}"
    lines.append(f"Pareto front: {status.front_size} trials{hv}")
    for level, best in status.best_at_sparsity.items():
        text = "no trial" if best is None else f"{best[0]:.4f} (trial {best[1]})"
        lines.append(f"best val accuracy at sparsity >= {level:.0%}: {text}")
    lines.append(f"workers seen in the last 15 minutes: {len(status.workers)}")
    lines += [
        f"  {w.worker}: {w.trials} trials, {w.running} running, "
        f"last seen {w.last_seen_s:.0f} s ago"
        for w in status.workers
    ]
    for number, worker, seconds in status.long_running:
        lines.append(
            f"trial {number} has run suspiciously long: {seconds / 60:.1f} min on {worker}"
        )
    return "\n".join(lines)


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
    p.add_argument(
        "--trials", type=_positive_int, help="trials the study holds in the end (its target)"
    )
    p.add_argument("--timeout", help="this run starts no trial after this long: 90, 30m, 8h")
    p.add_argument(
        "--workers", type=_positive_int, default=1, help="worker processes (default: 1)"
    )
    p.add_argument("--report", help="HTML report path (default: STUDY_NAME.html)")
    _heartbeat_and_quiet(p)
    p.set_defaults(run=_search)

    p = sub.add_parser("worker", help="join a study that `autoprune search` started")
    p.add_argument("--storage", required=True, help="the study's database URL or journal:PATH")
    p.add_argument("--study-name", help="needed when the storage holds several studies")
    p.add_argument("--trials", type=_positive_int, help="target (default: the study's)")
    p.add_argument("--timeout", help="this worker starts no trial after this long")
    p.add_argument("--threads", type=_positive_int, help="torch threads (default: torch's)")
    _heartbeat_and_quiet(p)
    p.set_defaults(run=_worker)

    p = sub.add_parser("status", help="trials by state, pace, front, workers, stuck trials")
    _study_arguments(p)
    p.set_defaults(run=_status)
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
        if name == "front":
            p.add_argument("--study-name", help="needed when the storage holds several studies")
            p.add_argument("--csv", help="write the front to this CSV file")
            p.add_argument("--json", help="write the front to this JSON file")
            p.set_defaults(run=_front)
        else:
            p.add_argument(
                "--study-name",
                action="append",
                help="study to show (repeat to compare studies on one front plot)",
            )
            p.add_argument("--out", help="HTML path (default: STUDY_NAME.html)")
            p.add_argument(
                "--watch",
                type=_positive_float,
                metavar="SECONDS",
                help="rewrite the page this often (during a search) until interrupted",
            )
            p.set_defaults(run=_report)

    p = sub.add_parser("pick", help="choose one trial of the Pareto front and print it")
    _study_arguments(p)
    rule = p.add_mutually_exclusive_group(required=True)
    rule.add_argument("--min-accuracy", type=float, help="smallest model with this val accuracy")
    rule.add_argument("--max-params", type=float, help="most accurate with <= this many nonzero")
    rule.add_argument("--max-size", type=float, help="most accurate with its --by size <= this")
    rule.add_argument("--knee", action="store_true", help="the knee of the front")
    p.add_argument("--by", help="size objective (default: the study's first, e.g. nonzero_params)")
    p.set_defaults(run=_pick)

    p = sub.add_parser("export", help="write a trial's pruned model, policy and metrics")
    p.add_argument("trial", type=int, help="trial number (see `autoprune pick` / `front`)")
    p.add_argument("--out", required=True, help="directory to create")
    p.add_argument("--task", help="task reference that rebuilds the model (default: the study's)")
    p.add_argument("--artifact-dir", help="where the weights are (default: the study's record)")
    _study_arguments(p)
    p.set_defaults(run=_export)
    return parser


def _study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage", default=DEFAULT_STORAGE, help=f"database URL (default: {DEFAULT_STORAGE})"
    )
    p.add_argument("--study-name", help="needed when the storage holds several studies")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def _heartbeat_and_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--heartbeat",
        type=_positive_int,
        default=HEARTBEAT,
        help=f"seconds between heartbeats of a running trial (RDB storages; default: "
        f"{HEARTBEAT}); one silent for {GRACE_FACTOR}x as long is failed and retried",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


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


if __name__ == "__main__":
    sys.exit(main())
