"""Config schema, YAML loading, ``--set`` overrides and rejection cases."""

import glob
import os
import subprocess
import sys

import pytest

import train
from tfdml.training import build as build_lib
from tfdml.training import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def _load(*overrides, path=SMOKE):
    return config_lib.load(path, list(overrides))


# -- schema and YAML --


def test_defaults_fill_every_section():
    cfg = config_lib.resolve({"loss": "MultiSimilarityLoss"})
    assert set(cfg) == set(config_lib.SECTIONS)
    assert cfg["loss"] == {"name": "MultiSimilarityLoss"}
    assert cfg["miner"] is None
    assert cfg["data"]["samples_per_class"] == 4
    assert cfg["optimizer"]["learning_rate"] == 1e-3


def test_yaml_reads_exponent_floats():
    cfg = config_lib.load(
        text="loss: MultiSimilarityLoss\noptimizer: {learning_rate: 1e-5}\n"
    )
    assert cfg["optimizer"]["learning_rate"] == pytest.approx(1e-5)
    assert isinstance(cfg["optimizer"]["learning_rate"], float)


def test_int_is_accepted_as_float_but_bool_is_not_a_number():
    field = config_lib.SCHEMA["optimizer"]["learning_rate"]
    assert config_lib.check_value("optimizer.learning_rate", field, 1) == 1.0
    with pytest.raises(config_lib.ConfigError, match="learning_rate"):
        config_lib.check_value("optimizer.learning_rate", field, True)


def test_duplicate_yaml_key_is_rejected():
    with pytest.raises(config_lib.ConfigError, match="duplicate"):
        config_lib.load(text="loss: A\nloss: B\n")


@pytest.mark.parametrize(
    "text, key",
    [
        ("loss: MultiSimilarityLoss\nbogus: {}\n", "bogus"),
        ("loss: MultiSimilarityLoss\ntrain: {colour: red}\n", "train.colour"),
        (
            "loss: MultiSimilarityLoss\ntrain: {epochs: two}\n",
            "train.epochs",
        ),
        (
            "loss: MultiSimilarityLoss\ndata: {samples_per_class: 1}\n",
            "data.samples_per_class",
        ),
        (
            "loss: MultiSimilarityLoss\noptimizer: {learning_rate: -0.1}\n",
            "optimizer.learning_rate",
        ),
        (
            "loss: MultiSimilarityLoss\ntrain: {strategy: tpu}\n",
            "train.strategy",
        ),
        ("loss: {alpha: 2}\n", "loss.name"),
        ("data: {}\n", "loss"),
        (
            "loss: MultiSimilarityLoss\noptimizer: {schedule: multistep}\n",
            "optimizer.milestones",
        ),
        (
            "loss: MultiSimilarityLoss\ntrain: {strategy: mirrored, "
            "jit_compile: true}\n",
            "train.jit_compile",
        ),
        ("loss: MultiSimilarityLoss\ndata: {val_classes: 1.5}\n", "data.val"),
        ("loss: MultiSimilarityLoss\ndata: {source: tfds}\n", "data.name"),
    ],
)
def test_resolve_rejects_naming_the_key(text, key):
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.load(text=text)
    assert str(info.value).startswith(key), str(info.value)


# -- overrides --


def test_set_parses_yaml_scalars_and_overrides():
    cfg = _load(
        "optimizer.learning_rate=1e-4",
        "train.deterministic=true",
        "train.run_dir=null",
        "eval.recall_at=[1, 5]",
    )
    assert cfg["optimizer"]["learning_rate"] == pytest.approx(1e-4)
    assert cfg["train"]["deterministic"] is True
    assert cfg["train"]["run_dir"] is None
    assert cfg["eval"]["recall_at"] == [1, 5]


def test_set_on_registry_sections():
    cfg = _load("loss.alpha=3.0")
    assert cfg["loss"]["alpha"] == 3.0
    cfg = _load("loss=MultiSimilarityLoss")
    assert cfg["loss"] == {"name": "MultiSimilarityLoss"}
    cfg = _load("miner.name=MultiSimilarityMiner", "miner.epsilon=0.2")
    assert cfg["miner"] == {"name": "MultiSimilarityMiner", "epsilon": 0.2}


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epochs=1.5", "train.epochs"),
        ("train.epochs=0", "train.epochs"),
        ("train.nope=1", "train.nope"),
        ("nope.x=1", "nope"),
        ("train", "train"),
        ("epochs=3", "epochs"),
    ],
)
def test_set_is_type_checked(override, key):
    with pytest.raises(config_lib.ConfigError) as info:
        _load(override)
    assert str(info.value).startswith(key)


# -- validation by construction --


def test_unknown_loss_kwarg_is_rejected_by_construction():
    cfg = _load("loss.not_an_arg=1")
    with pytest.raises(config_lib.ConfigError, match="^loss"):
        build_lib.build_loss(cfg)


def test_bad_loss_value_names_the_kwarg():
    cfg = _load("loss.name=MultiSimilarityLoss", "loss.alpha=-1")
    with pytest.raises(config_lib.ConfigError) as info:
        build_lib.build_loss(cfg)
    assert str(info.value).startswith("loss.alpha"), str(info.value)


def test_unknown_model_kwarg_is_rejected():
    cfg = _load("model.colour=1")
    with pytest.raises(config_lib.ConfigError, match="^model.colour"):
        build_lib.validate(cfg)


def test_too_many_classes_per_batch():
    cfg = _load("data.classes_per_batch=500")
    with pytest.raises(config_lib.ConfigError) as info:
        build_lib.validate(cfg)
    assert str(info.value).startswith("data.classes_per_batch")


# -- the CLI: exit status 2 and nothing written --


@pytest.mark.parametrize(
    "override",
    [
        "data.unknown_key=1",
        "data.samples_per_class=one",
        "data.samples_per_class=1",
        "data.classes_per_batch=500",
        "loss.bogus_kwarg=1",
        "optimizer.learning_rate=-0.001",
    ],
    ids=["unknown", "type", "k_lt_2", "p_too_big", "loss_kwarg", "neg_lr"],
)
def test_cli_rejects_with_status_2_and_writes_nothing(
    tmp_path, capsys, override
):
    run_dir = tmp_path / "run"
    status = train.main(
        [
            "--config",
            SMOKE,
            "--set",
            f"train.run_dir={run_dir}",
            "--set",
            override,
        ]
    )
    assert status == 2
    err = capsys.readouterr().err
    key = override.split("=")[0]
    assert "config error" in err and key in err, err
    assert not run_dir.exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_subprocess_exit_status(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            "--config",
            SMOKE,
            "--set",
            f"train.run_dir={run_dir}",
            "--set",
            "data.samples_per_class=1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "data.samples_per_class" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_run_dir_of_another_config_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("resolved:\n  loss: {name: Other}\n")
    status = train.main(
        ["--config", SMOKE, "--set", f"train.run_dir={run_dir}"]
    )
    assert status == 2
    assert "train.run_dir" in capsys.readouterr().err
    assert sorted(os.listdir(run_dir)) == ["config.yaml"]


# -- every shipped config --


def test_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert "smoke.yaml" in names and "demo_cjk.yaml" in names
    assert len(CONFIGS) >= 30


def test_demo_config_ships_in_the_package():
    # python -m tfdml.demo reads the packaged copy (pyproject package-data);
    # configs/demo_cjk.yaml is the same file for readers of configs/.
    from tfdml.training import demo

    assert demo.CONFIG == os.path.join(ROOT, "tfdml", "training", "demo.yaml")
    with open(demo.CONFIG, encoding="utf-8") as f:
        packaged = f.read()
    with open(os.path.join(ROOT, "configs", "demo_cjk.yaml")) as f:
        assert packaged == f.read()


@pytest.mark.parametrize(
    "path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS]
)
def test_every_config_loads_and_builds(path):
    cfg = config_lib.load(path)
    # Loss, miner, weighting and constructor kwargs, without touching data.
    build_lib.build_loss(cfg)
    build_lib.validate_objects(cfg)
    p, k = cfg["data"]["classes_per_batch"], cfg["data"]["samples_per_class"]
    assert p >= 2 and k >= 2
