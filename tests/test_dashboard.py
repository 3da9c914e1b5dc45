"""The dashboard's data (asserted on the frames, not the figures) and its page."""

from __future__ import annotations

import json
import math
import multiprocessing
import random
import re
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from conftest import hand_setup
from optuna.trial import TrialState, create_trial
from test_cli import run
from test_report import TOTAL, VALUES, hand_made_trial

from autoprune.errors import OutputError, SpecError
from autoprune.report.data import (
    SENSITIVITY_ATTR,
    front_share,
    hypervolume_2d,
    hypervolume_history,
    param_importances,
    states_over_time,
    trials_frame,
)
from autoprune.report.page import (
    dashboard_data,
    dashboard_figures,
    watch_report,
    write_report,
)


def hand_made(name: str = "hand", storage: object = None, values=VALUES) -> optuna.Study:
    study = optuna.create_study(
        storage=storage, study_name=name, directions=["maximize", "minimize"]
    )
    study.set_metric_names(["accuracy", "nonzero_params"])
    hand_setup(study, accuracy=1.0)
    for i, (accuracy, nonzero) in enumerate(values):
        study.add_trial(hand_made_trial(accuracy, nonzero, i))
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": "x"}))
    return study


def test_hypervolume_2d_matches_optuna() -> None:
    rng = random.Random(0)
    from optuna._hypervolume import compute_hypervolume  # only as an oracle in this test

    for _ in range(20):
        points = [(rng.uniform(0, 3), rng.uniform(0, 1)) for _ in range(rng.randint(1, 12))]
        ours = hypervolume_2d(points)
        losses = np.array([[-x, -y] for x, y in points])  # Optuna minimises
        assert ours == pytest.approx(compute_hypervolume(losses, np.zeros(2)), abs=1e-12)
    assert hypervolume_2d([]) == 0.0
    assert hypervolume_2d([(-1.0, 0.9), (1.0, -0.5)]) == 0.0  # beyond the reference point


def test_hypervolume_history() -> None:
    study = hand_made()
    history = hypervolume_history(study)
    assert list(history["trial"]) == list(range(len(VALUES)))  # completion order
    assert history["hypervolume"].is_monotonic_increasing
    # The final front as (decades of compression, accuracy): (2, .5) (1, .9) (.7, .95) (.4, .99)
    expected = 2 * 0.5 + 1 * 0.4 + math.log10(5) * 0.05 + math.log10(2.5) * 0.04
    assert history["hypervolume"].iloc[-1] == pytest.approx(expected)
    assert history["hypervolume"].iloc[0] == pytest.approx(1 * 0.9)


def test_hypervolume_history_is_that_of_all_points_so_far() -> None:
    # The history keeps only a staircase; each value must still be the area of every point.
    rng = random.Random(1)
    values = [(rng.uniform(0.1, 1.0), rng.choice([10, 20, 40, 80, 100, 200])) for _ in range(40)]
    values += values[:5]  # equal points: neither covers the other
    history = hypervolume_history(hand_made(values=values))
    # No dense size in the study: a trial's relative size is its density, nonzero / TOTAL.
    points = [(-math.log10(nonzero / TOTAL), accuracy) for accuracy, nonzero in values]
    expected = [hypervolume_2d(points[: i + 1]) for i in range(len(points))]
    assert list(history["hypervolume"]) == pytest.approx(expected, abs=1e-12)


def test_states_and_share() -> None:
    study = hand_made()
    states = states_over_time(study)
    assert states.groupby("state")["count"].max().to_dict() == {"complete": 8, "fail": 1}
    share = front_share(trials_frame(study)).set_index(["aspect", "value"])
    # Front: 0, 1, 3, 5, 6; scope is global for trial numbers divisible by 3 (0, 3, 6).
    assert share.loc[("scope", "global"), "on_front"] == 3
    assert share.loc[("scope", "global"), "share_of_front"] == pytest.approx(3 / 5)
    assert share.loc[("scope", "layer"), "front_rate"] == pytest.approx(2 / 5)
    assert share.loc[("criterion", "magnitude"), "share_of_front"] == 1.0
    assert share.loc[("rule", "mean"), "trials"] == 4


def test_importances_need_trials(searched_study: optuna.Study) -> None:
    few = hand_made(values=VALUES[:3])
    frame, reason = param_importances(few)
    assert frame.empty and reason == "3 complete trials; importances need 4"
    frame, reason = param_importances(searched_study)
    assert reason == ""
    sums = frame.groupby("objective")["importance"].sum()
    assert list(sums.index) == ["accuracy", "nonzero_params"]
    assert sums.to_numpy() == pytest.approx([1.0, 1.0])


@pytest.fixture(scope="module")
def searched_study(_trained_task) -> optuna.Study:
    from autoprune import search

    return search(_trained_task, n_trials=6, seed=1, study_name="real")


def test_dashboard_data_of_several_studies(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'x.db'}"
    a, b = hand_made("a", storage), hand_made("b", storage, VALUES[:3])
    b.set_user_attr(SENSITIVITY_ATTR, {"conv": [[0.0, 0.9], [0.5, 0.8]], "fc": [[0.5, 0.7]]})
    data = dashboard_data([a, b])
    assert data.studies == ["a", "b"] and data.size == "nonzero_params"
    assert list(data.trials.groupby("study").size()) == [8, 3]
    assert set(data.details) == {f"a/{n}" for n in range(8)} | {f"b/{n}" for n in range(3)}
    detail = data.details["a/5"]
    assert detail["metrics"]["accuracy"] == 0.5 and detail["policy"]["rule"] == "mean"
    assert detail["layer_sparsity"] == dict.fromkeys(
        ["features.0", "classifier.1", "classifier.3"], 0.99
    )
    assert detail["history"]["val"] == [[0.0, 1.2], [1.0, 0.6]]
    assert data.initial == "a/0"  # the knee of a's front
    assert list(data.sensitivity["study"]) == ["b"] * 3
    assert data.importance_reason == (
        "a: no parameter was searched in every complete trial; "
        "b: 3 complete trials; importances need 4"
    )
    figures = dashboard_figures(data, [a, b])
    assert list(figures) == [
        "pareto", "hypervolume", "states", "share", "importances", "sensitivity", "loss-curves"
    ]  # fmt: skip
    pareto = figures["pareto"]
    assert [t.name for t in pareto.data] == [
        "a: dominated", "a: Pareto front", "b: dominated", "b: Pareto front"
    ]  # fmt: skip
    assert sorted(pareto.data[1].customdata) == sorted(f"a/{n}" for n in (0, 1, 3, 5, 6))


def test_the_page_never_copies_every_trial(tmp_path: Path, monkeypatch) -> None:
    # study.best_trials deep-copies every trial of the study (0.1 s at 1,000 trials): the
    # page reads the fronts with front_trials instead.
    storage = f"sqlite:///{tmp_path / 'x.db'}"
    a, b = hand_made("a", storage), hand_made("b", storage, VALUES[:3])
    copied: list[str] = []

    def best_trials(study: optuna.Study) -> list:
        copied.append(study.study_name)
        return []

    monkeypatch.setattr(optuna.Study, "best_trials", property(best_trials))
    write_report([a, b], tmp_path / "r.html")
    assert copied == []


def page_details(page: str) -> dict:
    match = re.search(r"<script type='application/json' id='autoprune-details'>(.*?)</script>",
                      page, flags=re.DOTALL)  # fmt: skip
    assert match
    return json.loads(match.group(1))


def test_page_embeds_the_details_safely(tmp_path: Path) -> None:
    study = hand_made("x</script><b>y")
    out = write_report(study, tmp_path / "r.html")
    page = out.read_text(encoding="utf-8")
    assert page_details(page) == dashboard_data([study]).details
    assert "<b>y" not in page.replace("\\u003c", "")  # the name never opens a tag
    assert "http-equiv='refresh'" not in page
    assert page.count("<script") == page.count("</script>")
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]


def test_watch_rewrites_with_a_refresh(tmp_path: Path) -> None:
    study = hand_made()
    out = watch_report([study], tmp_path / "w.html", every=30, rounds=1)
    assert "<meta http-equiv='refresh' content='30'>" in out.read_text(encoding="utf-8")
    with pytest.raises(SpecError, match="watch interval must be > 0 seconds, got 0"):
        watch_report([study], tmp_path / "w.html", every=0, rounds=1)


def test_watch_never_overlaps_and_skips_the_turns_it_overran(tmp_path: Path, monkeypatch) -> None:
    """A rewrite slower than the interval delays the next to the next whole turn after it
    began (the missed turns are dropped, not run back to back), and its page asks the browser
    to reload at that pace."""
    from autoprune.report import page

    now, events = [0.0], []
    durations = iter([0.5, 2.5, 0.5, 0.5])  # seconds each rewrite takes

    def write_report(studies: object, path: Path, *, refresh: float) -> Path:
        start = now[0]
        now[0] += next(durations)
        events.append((start, now[0], refresh))
        return Path(path)

    monkeypatch.setattr(page, "write_report", write_report)
    monkeypatch.setattr(page, "_now", lambda: now[0])
    monkeypatch.setattr(page, "_sleep", lambda seconds: now.__setitem__(0, now[0] + seconds))
    watch_report([hand_made()], tmp_path / "w.html", every=1.0, rounds=4)
    assert [start for start, _, _ in events] == [0.0, 1.0, 4.0, 5.0]  # turns 2, 3 skipped
    assert all(later[0] >= earlier[1] for earlier, later in zip(events, events[1:], strict=False))
    assert [refresh for _, _, refresh in events] == [1.0, 1.0, 3.0, 1.0]


def test_cli_report_of_two_studies(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path / 'x.db'}"
    hand_made("a", storage), hand_made("b", storage, VALUES[:2])
    code, out, _ = run(capsys, "report", "--storage", storage, "--study-name", "a",
                       "--study-name", "b")  # fmt: skip
    assert code == 0 and out == f"report: {tmp_path / 'a-vs-b.html'}\n"
    page = (tmp_path / "a-vs-b.html").read_text(encoding="utf-8")
    assert "autoprune report: a, b" in page and "<p>b: 2 complete trials" in page
    for bad in ("soon", "0", "nan", "1e300"):  # 1e300 overflowed the sleep, after a report
        with pytest.raises(SystemExit) as exit_:
            run(capsys, "report", "--storage", storage, "--watch", bad)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"--watch: must be a number of seconds > 0 and <= 86400, got {bad!r}" in err


@pytest.mark.parametrize(
    ("name", "file"),
    [("../escaped", "_escaped.html"), ("{tmp}/index", "{flat}_index.html")],
)
def test_report_name_from_a_study_name_stays_here(
    tmp_path: Path, capsys, monkeypatch, name: str, file: str
) -> None:
    """A study named by someone else on a shared database (``../escaped``, ``/var/www/index``)
    cannot choose where the page goes: it goes here, under a name made safe."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    hand_made(name.format(tmp=tmp_path), storage)
    file = file.format(flat=str(tmp_path).replace("/", "_"))
    code, out, _ = run(capsys, "report", "--storage", storage)
    assert code == 0 and out == f"report: {work / file}\n"
    assert [p.name for p in work.iterdir()] == [file]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.db", "work"]


def test_report_to_a_bad_path_writes_nothing(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path / 'x.db'}"
    hand_made("a", storage)
    (tmp_path / "adir").mkdir()
    for out, why in [("nodir/r.html", "does not exist"), ("adir", "it is a directory")]:
        code, stdout, err = run(capsys, "report", "--storage", storage, "--out", out)
        assert code == 2 and stdout == ""
        assert err.startswith(f"autoprune: error: cannot write {out!r}: ") and why in err
        assert err.count("\n") == 1
        code, stdout, err = run(capsys, "report", "--storage", storage, "--out", out,
                                "--watch", "1")  # fmt: skip
        assert code == 2 and stdout == "" and f"cannot write {out!r}" in err
    with pytest.raises(OutputError, match="cannot write '.*nodir/r.html'"):
        write_report(optuna.load_study(study_name="a", storage=storage), tmp_path / "nodir/r.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "x.db"]


def _report_writer(storage: str, path: Path, refresh: float, barrier, rounds: int) -> None:
    """Write the report of study "a" ``rounds`` times, each write started together with the
    other writer's (``barrier``). The page is computed once: the race is in the writing."""
    from autoprune.report import page

    try:
        study = optuna.load_study(study_name="a", storage=storage)
        data = page.dashboard_data([study])
        figures = page.dashboard_figures(data, [study])
        text = page.render(data, figures, refresh=refresh)
        page.dashboard_data = lambda studies: data
        page.dashboard_figures = lambda data, studies: figures
        page.render = lambda *args, **kwargs: barrier.wait() is None or text
        for _ in range(rounds):
            page.write_report([study], path, refresh=refresh)
    except BaseException:
        barrier.abort()
        raise


@pytest.mark.slow
def test_two_processes_writing_one_report(tmp_path: Path) -> None:
    """Two ``report --watch`` on one file, or a search finishing beside one: each writer
    has a temporary file of its own, so none crashes and the page is always whole."""
    storage = f"sqlite:///{tmp_path / 'x.db'}"
    hand_made("a", storage)
    path = tmp_path / "r.html"
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2, timeout=600)
    writers = [
        context.Process(target=_report_writer, args=(storage, path, every, barrier, 40))
        for every in (1.0, 2.0)
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=300)
    assert [w.exitcode for w in writers] == [0, 0]
    page = path.read_text(encoding="utf-8")
    assert page.endswith("</html>\n") and page.count("http-equiv='refresh'") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "x.db"]


def test_a_big_study_shows_every_front_trial_and_a_spread_of_the_others(tmp_path: Path) -> None:
    """Above ``max_dominated`` the page shows fewer dominated points, and nothing else
    changes: the front, its table, counts, shares, hypervolume and states are those of
    every trial."""
    rng = random.Random(4)
    values = [(rng.uniform(0.1, 1.0), rng.choice([10, 20, 40, 80, 100, 200])) for _ in range(40)]
    study = hand_made("big", f"sqlite:///{tmp_path / 'x.db'}", values)
    every = dashboard_data([study], max_dominated=None)
    few = dashboard_data([study], max_dominated=5)
    front = {t.number for t in study.best_trials}
    shown = set(few.trials["trial"])
    assert front <= shown and len(shown - front) == 5 and len(every.trials) == 40
    assert set(few.details) == {f"big/{n}" for n in shown}
    assert few.details == {k: v for k, v in every.details.items() if k in few.details}
    kept = every.trials[every.trials["trial"].isin(shown)].reset_index(drop=True)
    pd.testing.assert_frame_equal(few.trials, kept)
    pd.testing.assert_frame_equal(every.trials.drop(columns=["study", "key"]), trials_frame(study))
    for name in ("front", "share", "hypervolume", "states", "importances"):
        pd.testing.assert_frame_equal(getattr(few, name), getattr(every, name))
    share = front_share(trials_frame(study)).assign(study="big")
    pd.testing.assert_frame_equal(few.share, share)
    dominated = 40 - len(front)
    assert f"5 of the {dominated} dominated trials shown" in few.summaries[0]
    assert "dominated trials shown" not in every.summaries[0]
    assert few.initial == every.initial


def test_long_lines_keep_their_steps_and_their_last_point() -> None:
    from autoprune.report import figures

    steps = [min(i // 700, 3) / 3 for i in range(3000)]
    history = pd.DataFrame({"trial": range(3000), "completed": range(3000), "hypervolume": steps})
    drawn = figures.hypervolume_figure(history).data[0]
    assert list(drawn.y) == [0.0, 1 / 3, 2 / 3, 1.0, 1.0]  # every step, and the end
    assert list(drawn.x) == [0, 700, 1400, 2100, 2999]
    states = pd.DataFrame({"time": range(2500), "state": "complete", "count": range(1, 2501)})
    line = figures.states_figure(states).data[0]
    assert len(line.y) <= figures.MAX_LINE_POINTS + 1 and line.y[-1] == 2500 and line.y[0] == 1


def test_importances_over_their_budget_are_skipped_with_a_note(
    searched_study: optuna.Study, tmp_path: Path, monkeypatch
) -> None:
    frame, reason = param_importances(searched_study, budget=0.0)
    assert frame.empty
    assert reason.startswith("importances skipped: fanova on 6 trials takes about ")
    assert reason.endswith("s of CPU, over the page's budget of 0 s")
    from autoprune.report import importance

    monkeypatch.setattr(importance, "BUDGET", 0.0)
    page = write_report(searched_study, tmp_path / "r.html").read_text(encoding="utf-8")
    assert "importances skipped: fanova on 6 trials" in page


def test_importances_use_ped_anova_on_a_bounded_sample_of_big_studies() -> None:
    from autoprune.report import importance

    assert importance.choose(99) == ("fanova", 99)
    assert importance.choose(100) == ("ped-anova", 100)
    assert importance.choose(10_000) == ("ped-anova", importance.SAMPLE)
    assert importance.spread(list(range(10)), 4) == [0, 2, 5, 7]
    assert importance.spread(list(range(3)), 4) == [0, 1, 2]
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_metric_names(["accuracy", "nonzero_params"])
    rng = random.Random(0)
    for _ in range(120):
        x, kind = rng.random(), rng.choice(["a", "b"])
        study.add_trial(
            create_trial(
                values=[x, 10.0 * (kind == "a") + rng.random()],
                params={"x": x, "kind": kind},
                distributions={
                    "x": optuna.distributions.FloatDistribution(0, 1),
                    "kind": optuna.distributions.CategoricalDistribution(["a", "b"]),
                },
            )
        )
    frame, reason = param_importances(study)
    assert reason == ""
    top = frame.loc[frame.groupby("objective")["importance"].idxmax()]
    assert dict(zip(top["objective"], top["param"], strict=True)) == {
        "accuracy": "x",
        "nonzero_params": "kind",
    }


def test_ped_anova_does_not_import_scikit_learn_and_fanova_still_does() -> None:
    """The page of a big study uses PED-ANOVA: Optuna's importance package is imported
    without scikit-learn (a second and a half), which fANOVA and mean decrease impurity
    import when they are made, giving what they give after a plain import."""
    script = """
import json, sys
import optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
study.optimize(lambda t: t.suggest_float("x", 0, 1) ** 2 + 0.1 * t.suggest_float("y", 0, 1),
               n_trials=30)
if sys.argv[1] == "lean":
    from autoprune.study._optuna import importance_package
    package = importance_package()
else:
    import optuna.importance as package
found = [sorted(package.get_param_importances(study, evaluator=e).items()) for e in (
    package.PedAnovaImportanceEvaluator(),)]
before = "sklearn" in sys.modules
found += [sorted(package.get_param_importances(study, evaluator=e).items()) for e in (
    package.FanovaImportanceEvaluator(seed=0),
    package.MeanDecreaseImpurityImportanceEvaluator(seed=0),
)]
print(json.dumps([before, found]))
"""
    import subprocess
    import sys

    done = {
        how: subprocess.run(
            [sys.executable, "-c", script, how], capture_output=True, text=True, timeout=600
        )
        for how in ("lean", "plain")
    }
    assert [d.returncode for d in done.values()] == [0, 0], [d.stderr for d in done.values()]
    (lean_before, lean), (plain_before, plain) = (json.loads(d.stdout) for d in done.values())
    assert (lean_before, plain_before) == (False, True)
    assert lean == plain
