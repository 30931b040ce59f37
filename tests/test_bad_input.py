"""Bad config and data input: exit status 2 naming the key, nothing written.

Every case goes through ``train.main`` (the ``train.py`` CLI) twice: with
``--check`` and for real. Both must stop with
:data:`tfdml.training.loop.EXIT_CONFIG`
before the run folder exists, and name the offending key on stderr.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import train
from tfdml.training import build as build_lib
from tfdml.training import config as config_lib
from tfdml.training import loop as loop_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# configs/smoke.yaml with its synthetic data keys in a section of their own
# so that an npz case can drop them.
SMOKE_REST = """\
model:
  image_size: 16
  channels: 1
  embedding_dim: 16
loss:
  name: MultiSimilarityLoss
optimizer:
  name: adam
  learning_rate: 1.0e-3
train:
  epochs: 2
  steps_per_epoch: 2
  seed: 0
  verbose: 0
eval:
  batch_size: 64
  recall_at: [1, 2, 4]
  plots: false
"""
SAMPLER = """\
  classes_per_batch: 4
  samples_per_class: 4
  val_classes: 4
  test_fraction: 0.4
"""
SYNTHETIC = (
    "data:\n  source: synthetic\n  num_classes: 24\n"
    "  examples_per_class: 10\n  size: 16\n" + SAMPLER + SMOKE_REST
)


def _npz_config(tmp_path, labels, name="data.npz"):
    """An npz data set of 16 x 16 gray images with ``labels``."""
    labels = np.asarray(labels, np.int64)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (len(labels), 16, 16), np.uint8)
    path = tmp_path / name
    np.savez(path, X=x, y=labels)
    return f"data:\n  source: npz\n  path: {path}\n" + SAMPLER + SMOKE_REST


def _labels(num_classes=24, per_class=10, offset=0, step=1):
    return np.repeat(offset + step * np.arange(num_classes), per_class)


def _singleton_class(split_position):
    """24 classes of 10 images, one with a single image.

    ``split_position``: index of that class in the sorted ids (the last
    40 % are the test split; the validation classes are drawn from the
    rest).
    """
    labels = list(_labels())
    c = split_position
    return [y for y in labels if y != c] + [c]


def _npz_file(tmp_path, content):
    """A config reading ``data.npz``: raw bytes, or ``"object"`` for an
    npz whose labels are a pickled object array."""
    path = tmp_path / "data.npz"
    if content == "object":
        y = np.array([0, 0, "a", 1], object)
        np.savez(path, X=np.zeros((4, 4, 4), np.uint8), y=y)
    else:
        path.write_bytes(content)
    return f"data:\n  source: npz\n  path: {path}\n" + SAMPLER + SMOKE_REST


def _write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


# name -> (make(tmp_path) -> (config text or bytes, overrides), key)
CASES = {
    "embedding_dim_0": (
        lambda t: (SYNTHETIC, ["model.embedding_dim=0"]),
        "model.embedding_dim",
    ),
    "embedding_dim_negative": (
        lambda t: (SYNTHETIC, ["model.embedding_dim=-4"]),
        "model.embedding_dim",
    ),
    "embedding_dim_string": (
        lambda t: (SYNTHETIC, ['model.embedding_dim="16"']),
        "model.embedding_dim",
    ),
    "embedding_dim_bool": (
        lambda t: (SYNTHETIC, ["model.embedding_dim=true"]),
        "model.embedding_dim",
    ),
    "unknown_backbone": (
        lambda t: (SYNTHETIC, ["model.backbone=resnet51"]),
        "model.backbone",
    ),
    "unknown_pooling": (
        lambda t: (SYNTHETIC, ["model.pooling=median"]),
        "model.pooling",
    ),
    "backbone_input_too_small": (
        lambda t: (SYNTHETIC, ["model.backbone=resnet50"]),
        "model.image_size",
    ),
    "recall_at_empty": (
        lambda t: (SYNTHETIC, ["eval.recall_at=[]"]),
        "eval.recall_at",
    ),
    "monitor_typo": (
        lambda t: (SYNTHETIC, ["eval.monitor=map_at_r"]),
        "eval.monitor",
    ),
    "monitor_with_val_prefix": (
        lambda t: (SYNTHETIC, ["eval.monitor=val_map@r"]),
        "eval.monitor",
    ),
    "monitor_recall_not_computed": (
        lambda t: (SYNTHETIC, ["eval.monitor=recall@8"]),
        "eval.monitor",
    ),
    "metrics_unknown_name": (
        lambda t: (SYNTHETIC, ["eval.metrics=[map@r, ndcg]"]),
        "eval.metrics",
    ),
    "metrics_not_a_list": (
        lambda t: (SYNTHETIC, ["eval.metrics=map@r"]),
        "eval.metrics",
    ),
    "synthetic_one_image_per_class": (
        lambda t: (SYNTHETIC, ["data.examples_per_class=1"]),
        "data.examples_per_class",
    ),
    "eval_max_per_class_1": (
        lambda t: (SYNTHETIC, ["data.eval_max_per_class=1"]),
        "data.eval_max_per_class",
    ),
    "npz_train_class_with_one_image": (
        lambda t: (_npz_config(t, _singleton_class(0)), []),
        "data.path",
    ),
    "npz_test_class_with_one_image": (
        lambda t: (_npz_config(t, _singleton_class(23)), []),
        "data.path",
    ),
    "top_level_list": (
        lambda t: ("- loss: MultiSimilarityLoss\n- data: {}\n", []),
        "config",
    ),
    "top_level_scalar": (lambda t: ("just a string\n", []), "config"),
    "not_utf8": (
        lambda t: (SYNTHETIC.replace("adam", "ad\xe4m").encode("latin-1"), []),
        "--config",
    ),
    "npz_not_a_zip": (
        lambda t: (_npz_file(t, b"not a zip file\n" * 8), []),
        "data.path",
    ),
    "npz_pickled_object_array": (
        lambda t: (_npz_file(t, "object"), []),
        "data.path",
    ),
}


def _run_cli(tmp_path, capsys, case, check):
    make, key = CASES[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    text, overrides = make(inputs)
    config = _write(inputs, text)
    before = sorted(os.listdir(inputs))
    run_dir = tmp_path / "run"
    argv = ["--config", config, "--set", f"train.run_dir={run_dir}"]
    for o in overrides:
        argv += ["--set", o]
    if check:
        argv.append("--check")
    status = train.main(argv)
    err = capsys.readouterr().err
    return status, err, key, run_dir, before, inputs


@pytest.mark.parametrize("check", [True, False], ids=["check", "run"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_naming_the_key(tmp_path, capsys, case, check):
    status, err, key, run_dir, before, inputs = _run_cli(
        tmp_path, capsys, case, check
    )
    assert status == loop_lib.EXIT_CONFIG, err
    assert "config error" in err and key in err, err
    assert not run_dir.exists()
    assert sorted(os.listdir(tmp_path)) == ["inputs"]
    assert sorted(os.listdir(inputs)) == before


def test_existing_run_folder_is_not_touched(tmp_path, capsys):
    """A bad config aimed at an existing run folder leaves it as it was."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("resolved: {}\n")
    (run_dir / "precious.txt").write_text("keep")
    config = _write(tmp_path, SYNTHETIC)
    status = train.main(
        [
            "--config",
            config,
            "--set",
            f"train.run_dir={run_dir}",
            "--set",
            "train.overwrite=true",
            "--set",
            "eval.monitor=mapr",
        ]
    )
    assert status == loop_lib.EXIT_CONFIG
    assert "eval.monitor" in capsys.readouterr().err
    assert sorted(os.listdir(run_dir)) == ["config.yaml", "precious.txt"]


def test_monitor_accepts_every_produced_metric():
    cfg = config_lib.load(text=SYNTHETIC)
    for name in ("map@r", "map", "mrr", "precision@1", "r_precision"):
        cfg["eval"]["monitor"] = name
        build_lib.validate_objects(cfg)
        # the monitor is always computed (map / mrr on the rank path)
        assert name in build_lib.eval_metrics(cfg)
    cfg["eval"]["monitor"] = "map@r"
    assert "map" not in build_lib.monitor_metrics(cfg)
    cfg["eval"]["metrics"] = ["map", "recall"]
    names = build_lib.monitor_metrics(cfg)
    assert "map" in names and "map@r" in names and "mrr" not in names
    for k in cfg["eval"]["recall_at"]:
        cfg["eval"]["monitor"] = f"recall@{k}"
        build_lib.validate_objects(cfg)


def test_huge_label_ids_are_remapped(tmp_path, capsys):
    """Ids of 1e12 scale (beyond int32 and any dense table) just work."""
    labels = _labels(offset=10**12, step=7_919_000_003)
    text = _npz_config(tmp_path, labels)
    config = _write(tmp_path, text)
    run_dir = tmp_path / "run"
    argv = ["--config", config, "--set", f"train.run_dir={run_dir}"]
    assert train.main([*argv, "--check"]) == 0, capsys.readouterr().err
    cfg = config_lib.load(config, [f"train.run_dir={run_dir}"])
    built = build_lib.validate(cfg)
    data = built.data
    assert len(np.unique(data.source.labels)) == 24
    assert data.num_train_classes == len(data.splits["train"])
    _, y = next(iter(data.train_batches(0)))
    y = np.asarray(y)
    assert y.min() >= 0 and y.max() < data.num_train_classes
    assert len(np.unique(y)) == cfg["data"]["classes_per_batch"]
    for split in ("val", "test"):
        _, ys = data.arrays(split)
        assert set(np.unique(ys)) == set(data.splits[split].tolist())
    assert not run_dir.exists()


def test_cli_check_subprocess_not_utf8(tmp_path):
    """``python train.py --check`` on a non-UTF-8 file: status 2, no
    traceback."""
    config = _write(
        tmp_path, SYNTHETIC.replace("adam", "ad\xe4m").encode("latin-1")
    )
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--config", config]
        + ["--check"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "--config" in proc.stderr and "UTF-8" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]
