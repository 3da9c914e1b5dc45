"""The commands that measure without searching: ``prune`` (a one-shot heuristic baseline)
and ``sensitivity`` (per-layer curves). Both import torch when they run, not when the command
line is parsed (see :mod:`autoprune.cli.searching`)."""

from __future__ import annotations

import argparse
import io
import math

from autoprune._files import atomic_write, check_output_file
from autoprune.cli._common import (
    DEFAULT_STORAGE,
    RegistryNames,
    create_in_existing_argument,
    fraction,
)


def _prune(args: argparse.Namespace) -> int:
    import torch

    from autoprune.pruning.masks import prunable_layers
    from autoprune.pruning.policy import RECOVERY_DEFAULTS
    from autoprune.spec import load_spec
    from autoprune.study.setup import check_seed
    from autoprune.trial import baseline

    spec = load_spec(args.spec)
    out = check_output_file(args.out) if args.out else None  # before the fine-tuning
    seed = spec.seed if args.seed is None else args.seed
    check_seed(seed)
    task = spec.load_task()
    layers = prunable_layers(task.model, spec.space.include, spec.space.exclude)
    recovery = {"distill": args.distill, "lr_scale": args.lr_scale, "rewind": args.rewind}
    result = baseline(
        task,
        args.policy,
        args.sparsity,
        seed=seed,
        layers=layers,
        schedule=args.schedule,
        **recovery,
    )
    m = result.metrics
    budget = (
        f"{task.finetune_steps} fine-tuning steps"
        if task.finetune_steps is not None
        else f"{task.finetune_epochs} fine-tuning epochs"
    )
    settings = "".join(
        f", {name} {value:g}" if name != "rewind" else ", rewound"
        for name, value in recovery.items()
        if value != RECOVERY_DEFAULTS[name]
    )
    schedule = "" if args.schedule == "oneshot" else f" ({args.schedule})"
    print(
        f"{args.policy} at {args.sparsity:g}{schedule} on {task.name}, {budget}{settings}: "
        f"sparsity {m['sparsity']:.4f}, val accuracy {m['accuracy']:.4f}, test "
        f"accuracy {m.get('test_accuracy', float('nan')):.4f}, "
        f"{int(m['nonzero_params'])} of {int(m['total_params'])} weights left"
    )
    for layer, value in result.layer_sparsity.items():
        print(f"  {layer}: sparsity {value:.4f}")
    if out is not None:
        buffer = io.BytesIO()
        torch.save(result.model.state_dict(), buffer)
        print(f"pruned model's state dict: {atomic_write(out, buffer.getvalue()).resolve()}")
    return 0


def _lr_scale(text: str) -> float:
    # Imported here, as RegistryNames does: a command that does not take it imports no torch.
    from autoprune.pruning.policy import MAX_LR_SCALE

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= MAX_LR_SCALE:
        raise argparse.ArgumentTypeError(
            f"must be a number > 0 and <= {MAX_LR_SCALE:g}, got {text!r}"
        )
    return value


def _sensitivity(args: argparse.Namespace) -> int:
    import pandas as pd

    from autoprune.spec import load_spec
    from autoprune.study.sensitivity import analyze
    from autoprune.study.study import open_study

    spec = load_spec(args.spec)
    storage = args.storage or spec.storage
    study_name = args.study_name or spec.name
    task = spec.load_task()
    study = open_study(
        spec.setup(task),
        task,
        storage=storage,
        study_name=study_name,
        create_in_existing=args.create_in_existing,
    )
    curves, enqueued = analyze(study, task, spec.warm_start.sparsities)
    table = pd.DataFrame(
        {layer: {s: a for s, a in curve} for layer, curve in curves.items()}
    ).T.rename(columns=lambda s: f"s={s:g}")
    print("val accuracy with one layer pruned (magnitude, no fine-tuning):")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"stored in study {study_name!r} in {storage}; {enqueued} trials enqueued from it")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``prune`` and ``sensitivity`` to the subcommands ``sub``."""
    p = sub.add_parser("prune", help="one-shot baseline: prune by a heuristic and fine-tune")
    p.add_argument("spec", help="study spec (task, layers, fine-tuning recipe, seed)")
    p.add_argument(
        "--policy",
        required=True,
        choices=RegistryNames("autoprune.pruning.allocation", "ALLOCATIONS"),
        metavar="ALLOCATION",
        help="allocation: %(choices)s",
    )
    p.add_argument("--sparsity", required=True, type=fraction, help="target, e.g. 0.9")
    p.add_argument(
        "--schedule",
        default="oneshot",
        choices=RegistryNames("autoprune.pruning.policy", "SCHEDULES"),
        metavar="SCHEDULE",
        help="when the sparsity is reached: %(choices)s (default: oneshot)",
    )
    p.add_argument(
        "--lr-scale",
        type=_lr_scale,
        default=1.0,
        help="fine-tune at the task's learning rate times this (default: 1)",
    )
    p.add_argument(
        "--distill",
        type=fraction,
        default=0.0,
        help="weight in [0, 1) of distillation from the dense model (default: 0, off)",
    )
    p.add_argument(
        "--rewind",
        action="store_true",
        help="a rewound learning-rate schedule (warm-up, then cosine decay) instead of the task's",
    )
    p.add_argument("--seed", type=int, help="fine-tuning seed (default: the spec's)")
    p.add_argument("--out", help="save the pruned model's state dict here")
    p.set_defaults(run=_prune)

    p = sub.add_parser("sensitivity", help="per-layer accuracy-vs-sparsity curves, stored")
    p.add_argument("spec", help="study spec; the study is created if it does not exist")
    p.add_argument("--storage", help=f"database URL (default: the spec's, else {DEFAULT_STORAGE})")
    p.add_argument("--study-name", help="study name (default: the spec's)")
    create_in_existing_argument(p)
    p.set_defaults(run=_sensitivity)
