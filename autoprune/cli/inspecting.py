"""The commands that read a study: ``front``, ``report``, ``pick`` and ``export``.

Each imports what it needs when it runs: ``front``, ``pick`` and ``report`` never import torch
(only ``export`` rebuilds a model), and ``pick`` neither pandas nor plotly.
"""

from __future__ import annotations

import argparse
import sys

from autoprune._files import atomic_write, check_output_dir, check_output_file, safe_filename
from autoprune.cli._common import DEFAULT_STORAGE, front_text, positive_float, study_arguments
from autoprune.errors import SpecError
from autoprune.study.artifacts import FrontWeights
from autoprune.study.loading import load_study
from autoprune.study.pick import pick
from autoprune.study.trial_metrics import metric_names, study_total_params, trial_metrics


def _front(args: argparse.Namespace) -> int:
    from autoprune.report.data import pareto_front

    if args.csv and args.json:
        raise SpecError("give --csv or --json, not both")
    out = check_output_file(args.csv or args.json) if args.csv or args.json else None
    study = load_study(args.storage, args.study_name)
    front = pareto_front(study)
    if out is None:
        print(front_text(front))
        return 0
    if args.csv:
        atomic_write(out, front.to_csv(index=False))
    else:
        atomic_write(out, front.to_json(orient="records", indent=2, double_precision=15))
    print(f"wrote {len(front)} front trials to {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from autoprune.report.page import watch_report, write_report

    out = check_output_file(args.out) if args.out else None
    studies = [load_study(args.storage, name) for name in args.study_name or [None]]
    # Study names come from a database that others write: never a path of their choosing.
    names = "-vs-".join(s.study_name for s in studies)
    out = out or check_output_file(safe_filename(names, ".html"))
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
        max_bytes=args.max_bytes,
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
        f"{policy.get('scope')}, rule {policy.get('rule')}, quantization "
        f"{policy.get('quantization', 'none')}; {stored_text}"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from autoprune.deploy.directory import export

    check_output_dir(args.out)  # before the study is read; export checks it again
    study = load_study(args.storage, args.study_name)
    done = export(
        study,
        args.trial,
        args.out,
        task_ref=args.task,
        artifact_dir=args.artifact_dir,
        format=args.format,
    )
    m = done.metrics
    how = "its stored weights" if done.source == "artifact" else "a replay (no stored weights)"
    print(
        f"exported trial {done.trial} from {how} to {done.directory}: val accuracy "
        f"{m['accuracy']:.4f}, test accuracy {_number(m['test_accuracy'])}, "
        f"{m['nonzero_params']} "
        f"nonzero weights, {m['bytes']} bytes (dense {m['dense_bytes']}), {m['macs']} MACs"
    )
    if "onnx" in m:
        onnx, check = m["onnx"], m["onnx"]["fp32_check"]
        latency = ", ".join(
            f"{v:.3f} ms at {k.replace('_', ' ')}" for k, v in onnx["latency_ms"].items()
        )
        print(
            f"model.onnx ({onnx['quantization']}): {onnx['bytes']} bytes; ONNX Runtime "
            f"{latency} ({onnx['latency_threads']} thread); fp32 graph within "
            f"{check['max_abs_diff']:.2g} of PyTorch (tolerance {check['atol']:g} + "
            f"{check['rtol']:g} x |output|); recorded val accuracy "
            f"{'reproduced' if m['reproduced'] else 'NOT reproduced'}"
        )
    return 0


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``front``, ``report``, ``pick`` and ``export`` to the subcommands ``sub``."""
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
            p.add_argument(
                "--out", help="HTML path (default: STUDY_NAME.html, in the current directory)"
            )
            p.add_argument(
                "--watch",
                type=positive_float,
                metavar="SECONDS",
                help="rewrite the page this often (during a search) until interrupted",
            )
            p.set_defaults(run=_report)

    p = sub.add_parser("pick", help="choose one trial of the Pareto front and print it")
    study_arguments(p)
    rule = p.add_mutually_exclusive_group(required=True)
    rule.add_argument("--min-accuracy", type=float, help="smallest model with this val accuracy")
    rule.add_argument("--max-params", type=float, help="most accurate with <= this many nonzero")
    rule.add_argument("--max-size", type=float, help="most accurate with its --by size <= this")
    rule.add_argument(
        "--max-bytes", type=float, help="most accurate whose deployed file has <= this many bytes"
    )
    rule.add_argument("--knee", action="store_true", help="the knee of the front")
    p.add_argument("--by", help="size objective (default: the study's first, e.g. nonzero_params)")
    p.set_defaults(run=_pick)

    p = sub.add_parser("export", help="write a trial's pruned model, policy and metrics")
    p.add_argument("trial", type=int, help="trial number (see `autoprune pick` / `front`)")
    p.add_argument("--out", required=True, help="directory to create")
    p.add_argument("--task", help="task reference that rebuilds the model (default: the study's)")
    p.add_argument("--artifact-dir", help="where the weights are (default: the study's record)")
    p.add_argument(
        "--format",
        choices=["pytorch", "onnx"],
        help="model.pt, or model.onnx as deployed (default: the runtime the trial ran in)",
    )
    study_arguments(p)
    p.set_defaults(run=_export)
