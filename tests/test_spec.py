"""Study specs: the shipped TOML files parse, and every bad key is named in one line."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from autoprune.errors import SpecError
from autoprune.spec import Finetune, StudySpec, load_spec, parse_duration, spec_from_dict
from autoprune.study.space import SearchSpace

STUDIES = Path(__file__).resolve().parent.parent / "studies"
TRIALS = "an integer in [1, 10000000]"
SEED = "an integer in [0, 2147483647]"
DEVICES = "one of auto, cpu, cuda, cuda:N, mps"


def write_spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(text, encoding="utf-8")
    return path


def spec_error(path: Path) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_digits_cnn_spec_parses() -> None:
    spec = load_spec(STUDIES / "digits_cnn.toml")
    assert spec == StudySpec(
        task="digits-cnn",
        study_name="digits-cnn",
        storage="sqlite:///autoprune.db",
        trials=40,
        timeout=None,
        seed=0,
        space=SearchSpace(
            criteria=("magnitude", "random", "sensitivity", "taylor", "wanda"),
            scopes=("layer", "global"),
            rules=("ratio", "mean"),
            sparsity=(0.0, 0.98),
            alpha=(0.25, 4.0),
            include=("*",),
            exclude=(),
            parametrization="allocation",
            schedules=("oneshot", "gradual"),
        ),
        finetune=Finetune(epochs=2, lr=0.001, batch_size=32),
    )
    assert spec.name == "digits-cnn"


def test_digits_mlp_spec_parses() -> None:
    spec = load_spec(STUDIES / "digits_mlp.toml")
    assert spec.task == "digits-mlp"
    assert spec.timeout == 15 * 60
    assert spec.storage == "sqlite:///autoprune.db"  # the default
    assert spec.space.criteria == ("magnitude", "taylor")
    assert spec.space.rules == ("ratio",)
    assert spec.space.sparsity == (0.3, 0.98)
    assert spec.space.exclude == ("4",)
    assert spec.space.alpha == SearchSpace().alpha  # not given: the default
    assert spec.finetune == Finetune(epochs=2)


def test_defaults_and_name(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, 'task = "pkg.mod:make"\n'))
    assert spec == StudySpec(task="pkg.mod:make")
    assert spec.name == "pkg.mod:make"  # no study_name: the task reference
    # The spec's defaults:
    assert spec.space == SearchSpace(
        parametrization="allocation", schedules=["oneshot", "gradual"]
    )
    assert spec.finetune == Finetune()


def test_integer_lr_becomes_float(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, "[finetune]\nlr = 1\nepochs = 0\n"))
    assert spec.finetune == Finetune(epochs=0, lr=1.0)
    assert isinstance(spec.finetune.lr, float)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "trails = 5\n",
            "unknown key 'trails' (known: task, study_name, storage, trials, timeout, seed, "
            "sampler, space, warm_start, constraints, early_stop, finetune, artifacts, "
            "objectives, latency, device, fidelity)",
        ),
        (
            "[finetune]\nepoch = 1\n",
            "[finetune] unknown key 'epoch' (known: epochs, lr, batch_size, precision, steps, "
            "grad_accumulation, val_batches)",
        ),
        ('trials = "ten"\n', f"key 'trials' must be {TRIALS}, got 'ten'"),
        ("trials = 0\n", f"key 'trials' must be {TRIALS}, got 0"),
        ("trials = true\n", f"key 'trials' must be {TRIALS}, got True"),
        ("trials = 2.5\n", f"key 'trials' must be {TRIALS}, got 2.5"),
        (f"trials = {10**20}\n", f"key 'trials' must be {TRIALS}, got {10**20}"),
        ("seed = -1\n", f"key 'seed' must be {SEED}, got -1"),
        # The sampler's seed is the seed plus the trials run: numpy needs it below 2**32.
        ("seed = 4294967295\n", f"key 'seed' must be {SEED}, got 4294967295"),
        ("seed = 9223372036854775807\n", f"key 'seed' must be {SEED}, got 9223372036854775807"),
        ("task = 5\n", "key 'task' must be a non-empty string, got 5"),
        (  # a list is unhashable: the check must not look it up in a set or dict
            '[space]\ncriteria = [["magnitude"]]\n',
            "[space] unknown criterion ['magnitude'] (known: magnitude, random, sensitivity, "
            "taylor, wanda, fisher, l1, l2, bn_scale, fpgm)",
        ),
        ('storage = " "\n', "key 'storage' must be a non-empty string, got ' '"),
        ("space = 3\n", "key 'space' must be a table, got 3"),
        ("[finetune]\nlr = -1\n", "key 'finetune.lr' must be a number > 0 and <= 1000, got -1.0"),
        # 1e300 crashed the optimizer mid-trial (beyond float32)
        (
            "[finetune]\nlr = 1e300\n",
            "key 'finetune.lr' must be a number > 0 and <= 1000, got 1e+300",
        ),
        ("[finetune]\nepochs = -1\n", "key 'finetune.epochs' must be an integer >= 0, got -1"),
        (
            "[finetune]\nbatch_size = 0\n",
            "key 'finetune.batch_size' must be an integer >= 1, got 0",
        ),
        (
            'timeout = "soon"\n',
            "key 'timeout': timeout must be seconds or a number with s, m, h or d, got 'soon'",
        ),
        ('device = "gpu"\n', f"key 'device' must be {DEVICES}, got 'gpu'"),
        ('device = "cuda:x"\n', f"key 'device' must be {DEVICES}, got 'cuda:x'"),
        ("device = 0\n", f"key 'device' must be {DEVICES}, got 0"),
        (
            '[finetune]\nprecision = "fp8"\n',
            "key 'finetune.precision' must be one of fp32, bf16, fp16, got 'fp8'",
        ),
    ],
)
def test_rejections_name_key_and_value(tmp_path: Path, text: str, expected: str) -> None:
    path = write_spec(tmp_path, text)
    assert spec_error(path) == f"{path}: {expected}"


# Messages of the search space's own checks (worded in autoprune.study.space): the spec prefixes
# them with the file and "[space]"; here only the key and the bad value are pinned.
@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ('[space]\ncriterion = ["magnitude"]\n', "unknown search-space key", "'criterion'"),
        ("[space]\nsparsity = [0.1, 1.0]\n", "sparsity", "[0.1, 1.0]"),
        ("[space]\nsparsity = [-0.1, 0.5]\n", "sparsity", "[-0.1, 0.5]"),
        ("[space]\nsparsity = [0.6, 0.2]\n", "sparsity", "[0.6, 0.2]"),
        ('[space]\nsparsity = [0.1, "x"]\n', "sparsity", "'x'"),
        ("[space]\nalpha = [2.0, 1.0]\n", "alpha", "[2.0, 1.0]"),
        ("[space]\nalpha = [0.0, 1.0]\n", "alpha", "[0.0, 1.0]"),
        ('[space]\nscopes = ["layer", "local"]\n', "unknown scope", "'local'"),
        ('[space]\nrules = ["median"]\n', "unknown rule", "'median'"),
        ('[space]\ncriteria = ["magnitude", "l0"]\n', "unknown criterion", "'l0'"),
        ('[space]\ncriteria = "magnitude"\n', "criteria", "'magnitude'"),
        ("[space]\ncriteria = []\n", "criteria", "[]"),  # as the user wrote it
        ('[space]\ninclude = "features.*"\n', "include", "'features.*'"),
    ],
)
def test_space_rejections_name_key_and_value(
    tmp_path: Path, text: str, key: str, value: str
) -> None:
    path = write_spec(tmp_path, text)
    message = spec_error(path)
    assert message.startswith(f"{path}: [space] ")
    assert key in message and value in message


def test_unknown_criterion(tmp_path: Path) -> None:
    # The list of known criteria grows with registrations, so only its head is fixed here.
    path = write_spec(tmp_path, '[space]\ncriteria = ["magnitude", "l0"]\n')
    message = spec_error(path)
    assert message.startswith(f"{path}: [space] unknown criterion 'l0' (known: ")
    assert "magnitude" in message and "taylor" in message


def test_malformed_toml(tmp_path: Path) -> None:
    path = write_spec(tmp_path, "trials = \n")
    assert spec_error(path).startswith(f"{path}: malformed TOML: ")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "spec.toml"
    path.write_bytes(b'task = "\xff"\n')
    assert spec_error(path).startswith(f"cannot read spec file {str(path)!r}: ")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert spec_error(path) == f"spec file {str(path)!r} does not exist"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (90, 90.0),
        (2.5, 2.5),
        ("90", 90.0),
        ("90s", 90.0),
        ("30m", 1800.0),
        ("8h", 28800.0),
        ("1d", 86400.0),
        ("1.5h", 5400.0),
        (" 10 m ", 600.0),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("soon", "timeout must be seconds or a number with s, m, h or d, got 'soon'"),
        ("-5m", "timeout must be seconds or a number with s, m, h or d, got '-5m'"),
        ("5 minutes", "timeout must be seconds or a number with s, m, h or d, got '5 minutes'"),
        ("", "timeout must be seconds or a number with s, m, h or d, got ''"),
        (True, "timeout must be seconds or a number with s, m, h or d, got True"),
        (0, "timeout must be positive, got 0"),
        ("0s", "timeout must be positive, got '0s'"),
        (-5, "timeout must be positive, got -5"),
        (math.inf, "timeout must be positive, got inf"),
        (math.nan, "timeout must be positive, got nan"),
    ],
)
def test_parse_duration_rejects(text: object, expected: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_duration(text)  # type: ignore[arg-type]
    assert str(info.value) == expected


def test_finetune_apply_overrides_only_given_fields(tiny_task) -> None:
    task = Finetune(epochs=3, batch_size=8).apply(tiny_task)
    assert (task.finetune_epochs, task.lr, task.batch_size) == (3, tiny_task.lr, 8)
    assert task.model is tiny_task.model  # shared, not copied
    assert task.train is tiny_task.train and task.name == tiny_task.name
    # The original task is frozen and unchanged.
    assert (tiny_task.finetune_epochs, tiny_task.batch_size) == (1, 32)

    task = Finetune(epochs=0, lr=0.5).apply(tiny_task)
    assert (task.finetune_epochs, task.lr, task.batch_size) == (0, 0.5, tiny_task.batch_size)
    assert Finetune().apply(tiny_task) == tiny_task
    assert Finetune(precision="bf16").apply(tiny_task).precision == "bf16"
    assert tiny_task.precision == "fp32"


def test_precision_and_device_parse_and_round_trip(tmp_path: Path) -> None:
    text = 'task = "digits-cnn"\ndevice = "cuda:1"\n[finetune]\nprecision = "bf16"\n'
    spec = load_spec(write_spec(tmp_path, text))
    assert spec.device == "cuda:1"
    assert spec.finetune == Finetune(precision="bf16")
    assert spec.to_dict()["device"] == "cuda:1"
    assert spec.to_dict()["finetune"] == {"precision": "bf16"}
    assert spec_from_dict(spec.to_dict()) == spec
    assert StudySpec().device is None  # the task's own


def test_the_spec_s_task_takes_its_device_and_precision(tmp_path: Path) -> None:
    """The device goes to the task the run uses, not to the study's setup; the precision goes
    to both (it is part of the fine-tuning recipe)."""
    spec = spec_from_dict(
        {"task": "digits-mlp", "device": "cpu", "finetune": {"precision": "bf16", "epochs": 0}}
    )
    task = spec.load_task()
    assert (task.device, task.precision, task.finetune_epochs) == ("cpu", "bf16", 0)
    setup = spec.setup(task)
    assert setup.finetune.precision == "bf16"
    assert "device" not in setup.to_dict() and "cpu" not in str(setup.identity())
    same = spec.setup(dataclasses.replace(task, device="auto"))
    assert same.identity() == setup.identity()


@pytest.mark.parametrize(
    "name",
    [
        "digits_cnn.toml",
        "digits_mlp.toml",
        "digits_resnet.toml",
        "digits_resnet_int8.toml",
        "digits_bert.toml",
        "digits_bert_heads.toml",
    ],
)
def test_to_dict_round_trips_and_is_plain_data(name: str) -> None:
    import json

    spec = load_spec(STUDIES / name)
    data = spec.to_dict()
    assert json.loads(json.dumps(data)) == data  # storable as a study user attr
    assert spec_from_dict(data) == spec
    assert None not in data.values() and None not in data["finetune"].values()


def test_to_dict_of_defaults_leaves_unset_keys_out() -> None:
    data = StudySpec().to_dict()
    assert "timeout" not in data and "study_name" not in data
    assert data["finetune"] == {}
    assert spec_from_dict(data) == StudySpec()


def test_digits_resnet_spec_parses() -> None:
    from autoprune.measure import Latency

    spec = load_spec(STUDIES / "digits_resnet.toml")
    assert spec.task == "digits-resnet"
    assert spec.objectives == ("accuracy", "macs", "latency_ms")
    assert spec.latency == Latency(batch_size=64, threads=1, repeats=20, warmup=3)
    assert spec.space.granularities == ("structured",)
    assert spec.space.round_to == 16 and spec.space.blocks == ("stages.*.1",)
    assert "bn_scale" in spec.space.channel_criteria


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('objectives = ["macs"]\n', "objectives must be a list starting with 'accuracy'"),
        ('objectives = ["accuracy", "flops"]\n', "unknown objective 'flops'"),
        (
            'objectives = ["accuracy", "latency_ms"]\n',
            "objective 'latency_ms' is blind to unstructured zeros",
        ),
        ("[latency]\nthreads = 0\n", "[latency] latency threads must be an integer >= 1, got 0"),
        ("[latency]\nbatch = 8\n", "[latency] unknown latency key 'batch'"),
        ('[space]\ngranularities = ["channel"]\n', "unknown granularity 'channel'"),
        ('[space]\nchannel_criteria = ["magnitude"]\n', "'magnitude' cannot score structured"),
        ("[space]\nround_to = 8\n", "round_to and blocks need 'structured' in granularities"),
    ],
)
def test_structured_and_objective_rejections(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in spec_error(write_spec(tmp_path, text))


def test_step_budget_accumulation_and_val_batches_reach_the_recipe(
    tmp_path: Path, tiny_task
) -> None:
    text = "[finetune]\nsteps = 5\ngrad_accumulation = 2\nval_batches = 1\n"
    spec = load_spec(write_spec(tmp_path, text))
    task = spec.finetune.apply(tiny_task)
    assert (task.finetune_steps, task.grad_accumulation, task.val_batches) == (5, 2, 1)
    recipe = spec.setup(task).finetune
    assert (recipe.steps, recipe.grad_accumulation, recipe.val_batches) == (5, 2, 1)
    assert recipe.apply(tiny_task) == task
    for key in ("steps", "grad_accumulation", "val_batches"):
        with pytest.raises(
            SpecError, match=f"key 'finetune.{key}' must be an integer >= 1, got 0"
        ):
            load_spec(write_spec(tmp_path, f"[finetune]\n{key} = 0\n"))


def test_epochs_and_steps_together_are_refused(tmp_path: Path) -> None:
    # steps would silently win over epochs: the spec names one budget
    text = "[finetune]\nepochs = 2\nsteps = 300\n"
    expected = "[finetune] give epochs or steps, not both (got epochs = 2, steps = 300)"
    assert expected in spec_error(write_spec(tmp_path, text))
