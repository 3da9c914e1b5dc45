"""Overnight scale: a digits-mlp study of 10,000 trials stays fast to run, to read and to watch.

Builds (once, cached under ``$TMPDIR/autoprune-bench-scale``; see ``_scale_study.py``)
SQLite studies of digits-mlp of 100, 1,000 and 10,000 trials as ``autoprune search
studies/digits_mlp.toml`` makes them, then measures:

- a trial's time outside the model, by part (sampler, storage, the front-weights and
  front-table callbacks, the progress bar, the worker loop, the rest of Optuna's loop), from
  real digits-mlp trials run by ``autoprune worker``'s trial loop on a copy of each study;
- that worker's memory (resident set) after its trials;
- ``autoprune status``, ``front``, ``pick --knee`` and ``report`` as commands;
- the report's load in headless Chromium (Selenium and Debian's chromedriver), with no
  console error;

and checks that the synthetic trials carry the user attrs of the real trial it ran. It exits
1 when a target is missed. Targets at 10,000 trials: report <= 5 s, status, front, pick
<= 2 s each, a trial's overhead <= 2x the one at 100 trials, memory <= 50 MB above the
worker's at 100 trials, the page loaded in Chromium without a console error in <= 5 s.

Commands and trial parts are judged on CPU seconds (user + system): the machine is shared,
and wall times there measure the neighbours; wall times are shown beside them.

    python scripts/bench_scale.py [--trials 30] [--repeat 2] [--timeout 600]

Run it on another checkout with ``PYTHONPATH=<checkout>`` (the cached studies are shared).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from _scale_study import NAME, cached_study

SIZES = (100, 1000, 10000)
READ_SIZES = (1000, 10000)
TARGETS = {"status": 2.0, "front": 2.0, "pick --knee": 2.0, "report": 5.0}
PAGE_TARGET, OVERHEAD_RATIO, MEMORY_MB = 5.0, 2.0, 50.0
# User attrs a real trial may carry or not: stored weights, a warm start's name.
OPTIONAL_ATTRS = {"artifact_id", "warm_start"}


class Clock:
    """Exclusive seconds per part, wall and CPU: time in a nested timed call counts to the
    inner part only."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._stack: list[list[Any]] = []  # [label, wall start, cpu start, child wall, cpu]

    def wrap(self, fn: Any, label: str) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._stack.append([label, time.perf_counter(), time.process_time(), 0.0, 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                _, wall0, cpu0, child_wall, child_cpu = self._stack.pop()
                wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
                self.wall[label] = self.wall.get(label, 0.0) + wall - child_wall
                self.cpu[label] = self.cpu.get(label, 0.0) + cpu - child_cpu
                if self._stack:
                    self._stack[-1][3] += wall
                    self._stack[-1][4] += cpu

        return timed

    def wrap_methods(self, obj: Any, names: list[str], label: str) -> None:
        for name in names:
            if callable(getattr(obj, name, None)):
                setattr(obj, name, self.wrap(getattr(obj, name), label))


def rss_mb() -> float:
    """This process's resident set size (MB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


def worker_run(db: Path, trials: int, out: Path) -> None:
    """Run ``trials`` real digits-mlp trials on the study in ``db`` as ``autoprune worker``
    does (progress bar included, one torch thread), timing each part; write the numbers to
    ``out`` (JSON). Runs in a process of its own, for its memory."""
    import torch

    import autoprune.measure
    from autoprune.cli.searching import _Progress
    from autoprune.run import worker
    from autoprune.study import objective
    from autoprune.study.artifacts import FrontWeights
    from autoprune.study.front_table import FrontTable

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    started = time.perf_counter()
    study, _, task = worker.join_study(f"sqlite:///{db}", NAME)
    n0 = len(study.get_trials(deepcopy=False))
    joined = time.perf_counter() - started
    clock = Clock()
    objective.prune_and_finetune = clock.wrap(objective.prune_and_finetune, "model")
    autoprune.measure.measure = clock.wrap(autoprune.measure.measure, "model")
    storage = study._storage
    clock.wrap_methods(storage, [m for m in dir(storage) if not m.startswith("__")], "storage")
    names = ["infer_relative_search_space", "sample_relative", "sample_independent"]
    clock.wrap_methods(study.sampler, [*names, "before_trial", "after_trial"], "sampler")
    for cls, method, label in (
        (FrontWeights, "__call__", "front weights"),
        (FrontWeights, "upload", "front weights"),
        (FrontTable, "__call__", "front table"),
        (_Progress, "refresh", "progress bar"),
    ):
        setattr(cls, method, clock.wrap(getattr(cls, method), label))
    for name in ("_has_work", "counted", "recover_orphans", "count_tracker"):
        if hasattr(worker, name):
            setattr(worker, name, clock.wrap(getattr(worker, name), "worker loop"))
    run = clock.wrap(worker.run_worker, "optuna, objective")
    with contextlib.redirect_stderr(io.StringIO()):  # the progress bar
        progress = _Progress(None)
        # Two trials first: what a process does once (gradients, caches) is no trial's.
        run(study, task, target=n0 + 2, callbacks=[progress])
        wall0, cpu0 = dict(clock.wall), dict(clock.cpu)
        run(study, task, target=n0 + 2 + trials, callbacks=[progress])
    cpu = {k: (v - cpu0.get(k, 0.0)) / trials for k, v in clock.cpu.items()}
    wall = {k: (v - wall0.get(k, 0.0)) / trials for k, v in clock.wall.items()}
    memory = rss_mb()  # before the real trial is read back (whole, with every other trial)
    real = optuna.load_study(study_name=NAME, storage=f"sqlite:///{db}").trials[-1]
    result = {
        "size": n0,
        "joined_s": joined,
        "cpu": cpu,
        "wall": wall,
        "rss_mb": memory,
        "real_user_attrs": real.user_attrs,
    }
    out.write_text(json.dumps(result, default=str))


def worker_in_process(n: int, trials: int, timeout: float) -> dict[str, Any]:
    """:func:`worker_run` on a copy of the ``n``-trial study, in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        db, out = Path(tmp) / "study.db", Path(tmp) / "result.json"
        shutil.copy(cached_study(n), db)
        command = [sys.executable, __file__, "_worker", str(db), str(trials), str(out)]
        subprocess.run(command, check=True, timeout=timeout)
        return json.loads(out.read_text())


def command_time(argv: list[str], repeat: int, timeout: float, cwd: Path) -> tuple[float, float]:
    """(CPU, wall) seconds of ``autoprune ARGV``, the fastest of ``repeat`` runs, in ``cwd``
    (not this checkout: ``python -m`` would import the package here, not PYTHONPATH's); inf
    when it runs longer than ``timeout`` or fails."""
    best = (math.inf, math.inf)
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        try:
            done = subprocess.run(
                [sys.executable, "-m", "autoprune", *argv],
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=cwd,
            )
        except subprocess.TimeoutExpired:
            return best
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            print(f"autoprune {' '.join(argv)} failed: {done.stderr.strip()}", file=sys.stderr)
            return best
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        best = min(best, (cpu, wall))
    return best


def page_load(page: Path) -> tuple[float, float, list[str]]:
    """Seconds until headless Chromium shows ``page``'s first trial (its script does once
    plotly has drawn every figure): the first load (the browser started, on a blank page),
    a reload (as ``report --watch`` makes the browser do), and the console errors; (nan,
    nan, [why]) when Chromium, chromedriver or Selenium is missing."""
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.remote.command import Command
        from selenium.webdriver.support.wait import WebDriverWait
    except ImportError:
        return math.nan, math.nan, ["selenium is not installed"]
    if chromium is None or driver_path is None:
        return math.nan, math.nan, ["chromium or chromedriver is not installed"]
    shown = "return document.getElementById('detail').dataset.shown"
    with tempfile.TemporaryDirectory() as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for argument in ("--headless", "--no-sandbox", "--disable-gpu",
                         "--window-size=1400,2000", f"--user-data-dir={profile}"):  # fmt: skip
            options.add_argument(argument)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        service = webdriver.ChromeService(executable_path=driver_path)
        driver = webdriver.Chrome(options=options, service=service)
        try:
            driver.set_page_load_timeout(300)
            driver.get("about:blank")
            seconds = []
            for load in (lambda: driver.get(page.as_uri()), driver.refresh):
                started = time.perf_counter()
                load()
                WebDriverWait(driver, 300, poll_frequency=0.02).until(
                    lambda d: d.execute_script(shown)
                )
                seconds.append(time.perf_counter() - started)
            entries = driver.execute(Command.GET_LOG, {"type": "browser"})["value"]
        finally:
            driver.quit()
    return seconds[0], seconds[1], [e["message"] for e in entries if e["level"] == "SEVERE"]


def shape(value: Any) -> Any:
    """The structure of a user attr: keys and kinds, not values."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return (
        "number"
        if isinstance(value, (int, float)) and not isinstance(value, bool)
        else (type(value).__name__)
    )


def synthetic_matches(real: dict[str, Any]) -> list[str]:
    """Differences between the user attrs of a real trial and of the synthetic ones."""
    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{cached_study(100)}")
    # Sampled trials, as the real one is: a warm start's policy leaves out the recovery
    # settings it pins at their defaults (lr_scale), as a real warm start's does.
    made = [
        t.user_attrs
        for t in study.trials
        if "policy" in t.user_attrs and "warm_start" not in t.user_attrs
    ]
    real = {k: v for k, v in real.items() if k not in OPTIONAL_ATTRS}
    problems = set()
    for attrs in made:
        attrs = {k: v for k, v in attrs.items() if k not in OPTIONAL_ATTRS}
        if sorted(attrs) != sorted(real):
            problems.add(f"user attrs {sorted(attrs)} are not a real trial's {sorted(real)}")
        for key in set(attrs) & set(real):
            if shape(attrs[key]) != shape(real[key]):
                problems.add(f"{key}: {shape(attrs[key])} is not {shape(real[key])}")
    return sorted(problems)


def trial_overhead(trials: int, timeout: float) -> list[str]:
    """Print a trial's overhead by part at each size and the worker's memory; the targets
    missed."""
    print(
        f"\ntrial overhead: ms per trial outside the model, CPU (wall), {trials} real "
        "digits-mlp trials each"
    )
    runs = {n: worker_in_process(n, trials, timeout) for n in SIZES}
    parts = sorted({p for r in runs.values() for p in r["cpu"]} - {"model"})
    print(f"{'study size':<20}" + "".join(f"{n:>18,}" for n in SIZES))
    for part in [*parts, "model"]:
        cells = [
            f"{1e3 * r['cpu'].get(part, 0):7.1f} ({1e3 * r['wall'].get(part, 0):6.1f})"
            for r in runs.values()
        ]
        print(f"{part:<20}" + "".join(f"{c:>18}" for c in cells))
    overhead = {n: sum(r["cpu"].get(p, 0.0) for p in parts) for n, r in runs.items()}
    print(f"{'overhead':<20}" + "".join(f"{1e3 * overhead[n]:>18.1f}" for n in SIZES))
    print(f"{'joining (s)':<20}" + "".join(f"{r['joined_s']:>18.1f}" for r in runs.values()))
    print(f"{'worker memory (MB)':<20}" + "".join(f"{r['rss_mb']:>18.0f}" for r in runs.values()))
    missed = []
    ratio = overhead[SIZES[-1]] / overhead[SIZES[0]]
    growth = runs[SIZES[-1]]["rss_mb"] - runs[SIZES[0]]["rss_mb"]
    if ratio > OVERHEAD_RATIO:
        missed.append(f"trial overhead at {SIZES[-1]:,} is {ratio:.2f}x the one at {SIZES[0]}")
    if growth > MEMORY_MB:
        missed.append(f"worker memory grows {growth:.0f} MB from {SIZES[0]} to {SIZES[-1]:,}")
    problems = synthetic_matches(runs[SIZES[0]]["real_user_attrs"])
    verdict = "yes" if not problems else "NO: " + "; ".join(problems)
    print(f"synthetic trials carry a real trial's user attrs: {verdict}")
    return missed + [f"synthetic trials: {p}" for p in problems]


def commands_and_page(repeat: int, timeout: float) -> list[str]:
    """Print the reading commands' times and the report's load in Chromium; the targets
    missed."""
    missed = []
    print(f"\ncommands: CPU s (wall s), fastest of {repeat}")
    print(f"{'command':<14}" + "".join(f"{n:>18,}" for n in READ_SIZES) + "   target")
    with tempfile.TemporaryDirectory() as tmp:
        pages = {n: Path(tmp) / f"report-{n}.html" for n in READ_SIZES}
        for command, target in TARGETS.items():
            cells = []
            for n in READ_SIZES:
                argv = [*command.split(), "--storage", f"sqlite:///{cached_study(n)}"]
                argv += ["--out", str(pages[n])] if command == "report" else []
                cpu, wall = command_time(argv, repeat, timeout, Path(tmp))
                cells.append(f"{cpu:6.2f} ({wall:6.2f})" if math.isfinite(cpu) else "timeout")
                if n == READ_SIZES[-1] and not cpu <= target:
                    missed.append(f"{command} takes {cpu:.2f} s of CPU at {n:,} (> {target:g})")
            print(f"{command:<14}" + "".join(f"{c:>18}" for c in cells) + f"   <= {target:g} s")
        print(
            "\nthe report in headless Chromium: s until the first trial is shown, first (reload)"
        )
        for n in READ_SIZES:
            if not pages[n].exists():
                print(f"{n:>7,} trials: no page")
                missed.append(f"no report page of {n:,} trials to load")
                continue
            first, again, errors = min(page_load(pages[n]) for _ in range(repeat))
            size = pages[n].stat().st_size / 2**20
            print(
                f"{n:>7,} trials: {first:.2f} s ({again:.2f} s), page {size:.1f} MB, "
                f"console errors: {errors or 'none'}"
            )
            if n == READ_SIZES[-1] and (errors or not first <= PAGE_TARGET):
                missed.append(f"page of {n:,} trials: {first:.2f} s, errors {errors}")
    return missed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30, help="real trials per size")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each command")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per command")
    parser.add_argument("--skip-trials", action="store_true", help="commands and page only")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"autoprune from {_package_dir()}; load average {os.getloadavg()[0]:.1f}")
    for n in SIZES:
        cached_study(n)
    missed = [] if args.skip_trials else trial_overhead(args.trials, args.timeout * 3)
    missed += commands_and_page(args.repeat, args.timeout)
    print("\n" + ("every target met" if not missed else "MISSED: " + "; ".join(missed)))
    return 1 if missed else 0


def _package_dir() -> str:
    import autoprune

    return str(Path(autoprune.__file__).parent)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_worker"]:
        worker_run(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
        sys.exit(0)
    sys.exit(main())
