"""Multi-fidelity against full trials at the same fine-tune compute (a short measurement).

For each seed, an ``autoprune.search`` study of a task (default arguments otherwise) with and
without ``fidelity`` (:class:`autoprune.Fidelity`), both given the compute of ``--trials`` full
trials. Per study: the front's hypervolume and best@s as ``scripts/_search_bench.py`` computes
them (test accuracy of the val-selected full-fidelity point at sparsity >= s), the compute
spent (full-trial equivalents, from the trials' ``fidelity``), trials run, and wall time.

    nice python scripts/bench_fidelity.py [--task digits-mlp] [--trials 20] [--seeds 0]
        [--screen 0.25] [--promote 0.34]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _search_bench import best_at, hypervolume  # noqa: E402
from _search_targets import THRESHOLDS  # noqa: E402

import autoprune  # noqa: E402
from autoprune.study.fidelity import Fidelity, compute  # noqa: E402
from autoprune.study.front import front_trials  # noqa: E402
from autoprune.tasks import load_task  # noqa: E402


def measure(task_name: str, trials: int, seed: int, fidelity: Fidelity | None) -> dict:
    task = load_task(task_name, seed=seed)
    start = time.perf_counter()
    study = autoprune.search(task, n_trials=trials, seed=seed, fidelity=fidelity)
    wall = time.perf_counter() - start
    points = [
        {
            "val": t.values[0],
            "test": t.user_attrs["test_accuracy"],
            "sparsity": 1.0 - t.user_attrs["density"],
        }
        for t in front_trials(study)
    ]
    done = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    row = {f"best@{s}": best_at(points, s) for s in THRESHOLDS}
    row.update(
        hv=hypervolume(points),
        compute=compute([t for t in done if t.state != optuna.trial.TrialState.FAIL]),
        trials=len(done),
        wall=wall,
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits-mlp")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--screen", type=float, default=0.25)
    parser.add_argument("--promote", type=float, default=0.34)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fidelity = Fidelity(screen=args.screen, promote=args.promote)
    for seed in args.seeds:
        for label, setting in (("full trials", None), (f"fidelity {fidelity}", fidelity)):
            row = measure(args.task, args.trials, seed, setting)
            cells = "  ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
            )
            print(f"{args.task} seed {seed} {label}: {cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
