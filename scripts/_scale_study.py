"""The synthetic digits-mlp studies of ``scripts/bench_scale.py``, built once and cached.

A study is what ``autoprune search studies/digits_mlp.toml`` makes: the spec's real setup
(the dense model is trained or read from autoprune's cache), and trials that carry the user
attrs, system attrs, params and distributions of real digits-mlp trials (``bench_scale.py``
checks them against a trial it runs for real). Accuracy falls off with density, with noise,
quantised as a 359-sample validation set quantises it; every hundredth trial fails; the first
twenty are the spec's warm starts; a trial not dominated when it completed has stored weights
(an ``artifact_id``), as the front-weights hook gives it.

The trials are inserted into Optuna's tables in one transaction (Optuna's ``add_trials`` makes
about 40 queries a trial: ten minutes for 10,000 here), and a sample is read back through
Optuna and compared with what was made.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import random
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from autoprune.spec import load_spec

SPEC = Path(__file__).resolve().parent.parent / "studies" / "digits_mlp.toml"
NAME = "digits-mlp"
CACHE = Path(tempfile.gettempdir()) / "autoprune-bench-scale"
BUILD_FORMAT = 2  # bump when the synthetic trials change: the cache is rebuilt
START = datetime.datetime(2025, 1, 1, 20, 0, 0)
STEP = 0.18  # seconds between two trials (1,500 trials took 4.5 minutes)
WORKER = "bench:4242"
VAL, TEST = 359, 360  # digits-mlp's validation and test set sizes: accuracies are k / n

CRITERIA = ("magnitude", "taylor")
ALLOCATIONS = ("lamp", "erk", "global", "uniform")
SCHEDULES = ("oneshot", "gradual")
LR_SCALE = load_spec(SPEC).space.lr_scale  # the bounds the real trials draw their rate from
SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)
WARM = [(a, d, s) for s in SCHEDULES for d in SPARSITIES for a in ("lamp", "global")]


def _distributions(layers: list[str]) -> dict[str, Any]:
    return {
        "criterion": CategoricalDistribution(CRITERIA),
        "allocation": CategoricalDistribution(ALLOCATIONS),
        "density": FloatDistribution(0.016000000000000014, 0.7, log=True),
        **{f"offset:{layer}": FloatDistribution(-1.0, 1.0) for layer in layers},
        "schedule": CategoricalDistribution(SCHEDULES),
        "lr_scale": FloatDistribution(*LR_SCALE, log=True),
    }


def synthetic_trial(
    rng: random.Random,
    number: int,
    layers: list[str],
    sizes: list[int],
    front: list[tuple[float, float]],
) -> FrozenTrial:
    """One trial as ``autoprune search`` records it on digits-mlp: accuracy falls off as
    density drops, with noise, quantised like a real validation set; a trial not dominated
    when it completed has stored weights (``artifact_id``), as the front-weights hook does."""
    dists = _distributions(layers)
    system: dict[str, Any] = {}
    user: dict[str, Any] = {}
    if number < len(WARM):  # the warm starts come first
        allocation, sparsity, schedule = WARM[number]
        params: dict[str, Any] = {"criterion": "magnitude", "allocation": allocation}
        params |= {"density": 1.0 - sparsity, **{f"offset:{x}": 0.0 for x in layers}}
        params["schedule"] = schedule
        params["lr_scale"] = 1.0  # a warm start fine-tunes at the task's own rate
        system["fixed_params"] = dict(params)
        user["warm_start"] = f"{allocation}@{sparsity:g}" + (" gradual" * (schedule == "gradual"))
    else:
        params = {"criterion": rng.choice(CRITERIA), "allocation": rng.choice(ALLOCATIONS)}
        params["density"] = math.exp(rng.uniform(math.log(0.016), math.log(0.7)))
        params |= {f"offset:{x}": rng.uniform(-1.0, 1.0) for x in layers}
        params["schedule"] = rng.choice(SCHEDULES)
        params["lr_scale"] = math.exp(rng.uniform(*map(math.log, LR_SCALE)))
        if number >= 10 + len(WARM):
            system["tpe:relative_params:0"] = json.dumps(params, sort_keys=True)
    total = sum(sizes)
    spread = [0.03 * params[f"offset:{x}"] for x in layers]
    layer_sparsity = {
        x: min(0.999, max(0.0, 1.0 - params["density"] + d - sum(spread) / len(spread)))
        for x, d in zip(layers, spread, strict=True)
    }
    nonzero = round(sum(n * (1 - layer_sparsity[x]) for x, n in zip(layers, sizes, strict=True)))
    density = nonzero / total
    drop = 0.00146 * max(density, 0.012) ** -1.49 * rng.uniform(0.8, 1.6)
    accuracy = round(VAL * max(0.08, 0.986 - drop)) / VAL
    test = round(TEST * max(0.08, accuracy + rng.uniform(-0.02, 0.01))) / TEST
    steps = [0.25 * (i + 1) for i in range(8)]
    loss = 2.0 * drop + 0.003
    user |= {
        "worker": WORKER,
        "policy": {
            "sparsity": layer_sparsity,
            "criterion": params["criterion"],
            "scope": "layer",
            "rule": "ratio",
            "alpha": 1.0,
            "schedule": params["schedule"],
            **({"lr_scale": params["lr_scale"]} if params["lr_scale"] != 1.0 else {}),
        },
        "seed": number,
        "density": density,
        "test_accuracy": test,
        "layer_sparsity": layer_sparsity,
        "history": {
            "train": [[s, loss * rng.uniform(0.7, 1.3)] for s in steps],
            "val": [[float(e), loss * rng.uniform(0.8, 1.2)] for e in range(3)],
        },
        "timings": {
            "scoring": rng.uniform(4e-4, 7e-4),
            "masking": rng.uniform(2e-4, 2e-2),
            "finetuning": rng.uniform(0.05, 0.15),
            "evaluation": rng.uniform(1.4e-3, 2.7e-3),
        },
    }
    point = (accuracy, float(nonzero))
    if not any(a >= point[0] and n <= point[1] and (a, n) != point for a, n in front):
        artifact = str(uuid.UUID(int=rng.getrandbits(128)))
        user["artifact_id"] = artifact
        system[f"artifacts:{artifact}"] = json.dumps(
            {
                "artifact_id": artifact,
                "filename": "weights.pt",
                "mimetype": "application/vnd.snesdev-page-table",
                "encoding": None,
            }
        )
        front[:] = [(a, n) for a, n in front if not (point[0] >= a and point[1] <= n)]
        front.append(point)
    trial = create_trial(
        values=[accuracy, float(nonzero)],
        params=params,
        distributions=dists,
        user_attrs=user,
        system_attrs=system,
    )
    trial.number = number
    trial.datetime_start = START + datetime.timedelta(seconds=STEP * number)
    trial.datetime_complete = trial.datetime_start + datetime.timedelta(seconds=STEP * 0.9)
    return trial


def failed_trial(number: int, layers: list[str]) -> FrozenTrial:
    """A trial whose fine-tuning diverged (one in a hundred)."""
    trial = create_trial(
        state=TrialState.FAIL,
        user_attrs={
            "worker": WORKER,
            "seed": number,
            "fail_reason": "loss is nan after 3 steps of epoch 1",
        },
    )
    trial.number = number
    trial.datetime_start = START + datetime.timedelta(seconds=STEP * number)
    trial.datetime_complete = trial.datetime_start + datetime.timedelta(seconds=STEP * 0.5)
    return trial


def write_trials(engine: sqlalchemy.Engine, study_id: int, trials: list[FrozenTrial]) -> None:
    """Insert ``trials`` into a new study's tables in one transaction, as Optuna's RDB storage
    would write them one by one (its ``add_trials`` makes ~40 queries a trial: 10 minutes
    for 10,000 here). Optuna's own table definitions; :func:`build` reads a sample back."""
    from optuna.storages._rdb import models  # the schema, checked against Optuna 5.0

    utc = datetime.UTC
    rows: dict[Any, list[dict[str, Any]]] = {
        m.__table__: []
        for m in (
            models.TrialModel,
            models.TrialValueModel,
            models.TrialParamModel,
            models.TrialUserAttributeModel,
            models.TrialSystemAttributeModel,
        )
    }
    for trial_id, t in enumerate(trials, start=1):
        rows[models.TrialModel.__table__].append(
            {
                "trial_id": trial_id,
                "number": t.number,
                "study_id": study_id,
                "state": t.state,
                "datetime_start": t.datetime_start.astimezone(utc).replace(tzinfo=None),
                "datetime_complete": t.datetime_complete.astimezone(utc).replace(tzinfo=None),
            }
        )
        for objective, value in enumerate(t.values or []):
            stored, kind = models.TrialValueModel.value_to_stored_repr(value)
            rows[models.TrialValueModel.__table__].append(
                {"trial_id": trial_id, "objective": objective, "value": stored, "value_type": kind}
            )
        for name, value in t.params.items():
            dist = t.distributions[name]
            rows[models.TrialParamModel.__table__].append(
                {
                    "trial_id": trial_id,
                    "param_name": name,
                    "param_value": dist.to_internal_repr(value),
                    "distribution_json": optuna.distributions.distribution_to_json(dist),
                }
            )
        for model, attrs in (
            (models.TrialUserAttributeModel, t.user_attrs),
            (models.TrialSystemAttributeModel, t.system_attrs),
        ):
            rows[model.__table__] += [
                {"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
                for k, v in attrs.items()
            ]
    with engine.begin() as connection:
        for table, table_rows in rows.items():
            if table_rows:
                connection.execute(table.insert(), table_rows)


def _same(made: FrozenTrial, read: FrozenTrial) -> bool:
    fields = ("number", "state", "values", "params", "distributions", "user_attrs")
    fields += ("system_attrs", "datetime_start", "datetime_complete")
    return all(getattr(made, f) == getattr(read, f) for f in fields)


def build(path: Path, n: int, seed: int = 0) -> None:
    """Write a digits-mlp study of ``n`` synthetic trials to the SQLite file ``path``."""
    from autoprune.study.setup import write_setup
    from autoprune.study.study import dense_metrics
    from autoprune.tasks import load_task

    spec = load_spec(SPEC)
    task = spec.finetune.apply(load_task(spec.task, seed=spec.seed))
    setup = spec.setup(task)
    setup = dataclasses.replace(setup, trials=10 * n, dense=dense_metrics(task, setup))
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp}")
    study = optuna.create_study(
        storage=storage, study_name=NAME, directions=["maximize", "minimize"]
    )
    write_setup(study, setup)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(setup.objectives))
    layers = list(setup.layers)
    sizes = [task.model.get_submodule(x).weight.numel() for x in layers]
    rng, front = random.Random(seed), []
    trials = [
        failed_trial(i, layers) if i % 100 == 99 else synthetic_trial(rng, i, layers, sizes, front)
        for i in range(n)
    ]
    write_trials(storage.engine, study._study_id, trials)
    storage.engine.dispose()
    read = optuna.load_study(study_name=NAME, storage=f"sqlite:///{tmp}").get_trials()
    sample = range(0, n, max(1, n // 97))
    if len(read) != n or not all(_same(trials[i], read[i]) for i in sample):
        raise AssertionError("the synthetic trials do not read back as they were made")
    tmp.rename(path)


def cached_study(n: int) -> Path:
    """The SQLite file of the ``n``-trial study, built on first use (per autoprune version:
    a worker joins only a study of its own version)."""
    from autoprune._version import __version__

    path = CACHE / f"v{BUILD_FORMAT}-autoprune-{__version__}" / f"digits-mlp-{n}.db"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        build(path, n)
        print(f"built the {n}-trial study in {time.perf_counter() - started:.1f} s: {path}")
    return path
