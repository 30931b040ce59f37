"""Proxy losses in training: ``DMLModel.fit`` for every class, proxies in
checkpoints, the proxies' own optimizer (``proxy_optimizer`` /
``optimizer.proxy_lr_multiplier``), the config checks, MirroredStrategy and
a ``train.py`` run."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfdml.losses as L
from tests.conftest import tiny_encoder
from tfdml.models import DMLModel
from tfdml.training import build as build_lib
from tfdml.training import config as config_lib
from tfdml.training.checkpoint import Checkpointer
from tfdml.training.checkpoint import state_variables

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
NEW = [
    "ProxyAnchorLoss",
    "ProxyNCALoss",
    "NormalizedSoftmaxLoss",
    "CosFaceLoss",
    "ArcFaceLoss",
    "SubCenterArcFaceLoss",
    "SoftTripleLoss",
]
C, D = 4, 6


def data(n_per=4):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(C), n_per).astype("int32")
    x = rng.random((len(y), 8, 8, 1)).astype("float32")
    x += y[:, None, None, None] * 0.1
    return x, y


def model_with(loss, **compile_kwargs):
    keras.utils.set_random_seed(0)
    model = DMLModel(tiny_encoder(8, 8, 1, D))
    compile_kwargs.setdefault("optimizer", keras.optimizers.Adam(1e-2))
    model.compile(loss=loss, **compile_kwargs)
    return model


@pytest.mark.parametrize("name", NEW)
def test_fit_smoke(name):
    model = model_with({"name": name, "num_classes": C})
    loss = model.loss
    assert isinstance(loss, L.ProxyLoss)
    assert loss.proxies.shape[-1] == D  # sized from the encoder
    assert any(v is loss.proxies for v in model.trainable_variables)
    before = [v.numpy().copy() for v in model.trainable_variables]
    x, y = data()
    hist = model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
    assert np.all(np.isfinite(hist.history["loss"]))
    after = [v.numpy() for v in model.trainable_variables]
    moved = [not np.allclose(a, b) for a, b in zip(after, before)]
    assert all(moved), moved  # encoder and proxies both train


def test_proxies_saved_and_restored_by_checkpoints(tmp_path):
    model = model_with(
        L.ProxyAnchorLoss(num_classes=C),
        proxy_optimizer=keras.optimizers.Adam(0.1),
    )
    x, y = data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    loss = model.loss
    saved = loss.proxies.numpy().copy()
    moments = [v.numpy().copy() for v in model.proxy_optimizer.variables]
    # tf.train.Checkpoint of the model
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "m"))
    loss.proxies.assign(np.zeros_like(saved))
    tf.train.Checkpoint(model=model).read(path).assert_consumed()
    np.testing.assert_array_equal(loss.proxies.numpy(), saved)
    # the run's Checkpointer with the variables train.py lists
    variables = state_variables(model, model.optimizer, model.proxy_optimizer)
    ckpt = Checkpointer(str(tmp_path / "ck"), variables)
    from tfdml.training.checkpoint import RunState

    state = RunState()
    ckpt.save(1, state)
    loss.proxies.assign(np.zeros_like(saved))
    for v in model.proxy_optimizer.variables:
        v.assign(tf.zeros_like(v))
    ckpt.restore(state.checkpoint)
    np.testing.assert_array_equal(loss.proxies.numpy(), saved)
    for v, m in zip(model.proxy_optimizer.variables, moments):
        np.testing.assert_array_equal(v.numpy(), m)


def test_proxy_optimizer_moves_proxies_at_their_own_rate():
    lr, mult = 0.01, 100.0
    model = model_with(
        L.ProxyNCALoss(num_classes=C),
        optimizer=keras.optimizers.SGD(lr),
        proxy_optimizer=keras.optimizers.SGD(lr * mult),
    )
    loss = model.loss
    x, y = data()
    enc_vars = model.encoder.trainable_variables
    with tf.GradientTape() as tape:
        emb = model.encoder(x, training=True)["embeddings"]
        value = tf.reduce_mean(loss.per_anchor(emb, y))
    grads = tape.gradient(value, enc_vars + [loss.proxies])
    before = [v.numpy().copy() for v in enc_vars + [loss.proxies]]
    model.fit(x, y, batch_size=len(y), epochs=1, verbose=0, shuffle=False)
    after = [v.numpy() for v in enc_vars + [loss.proxies]]
    rates = [lr] * len(enc_vars) + [lr * mult]
    for b, a, g, rate in zip(before, after, grads, rates):
        np.testing.assert_allclose(a - b, -rate * g.numpy(), atol=1e-6)
    assert np.abs(after[-1] - before[-1]).max() > 1e-3


def test_main_optimizer_has_no_slots_for_the_proxies():
    # With a proxy_optimizer the main optimizer never updates the proxies,
    # so it must not hold Adam moments for them either. Under a strategy,
    # fit builds the model symbolically and Keras builds an unbuilt
    # optimizer over every trainable variable (train.py built it so too).
    n = 7  # proxies [7, 6]: no encoder variable has that shape
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        model = model_with(
            L.ProxyAnchorLoss(num_classes=n),
            proxy_optimizer=keras.optimizers.Adam(0.1),
        )
    proxies = model.loss.proxies
    enc = model.encoder.trainable_variables
    assert tuple(proxies.shape) == (n, D)
    assert (n, D) not in {tuple(v.shape) for v in enc}
    x, y = data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    shapes = [tuple(v.shape) for v in model.optimizer.variables]
    assert (n, D) not in shapes, shapes
    # iterations, learning rate, then two moments per encoder variable
    assert sorted(shapes) == sorted(
        [(), ()] + [tuple(v.shape) for v in enc for _ in "mv"]
    )
    assert (n, D) in [tuple(v.shape) for v in model.proxy_optimizer.variables]
    main = {id(v) for v in model.main_trainable_variables}
    assert id(proxies) not in main
    assert main == {id(v) for v in model.trainable_variables} - {id(proxies)}
    # Without a proxy optimizer the main one updates the proxies.
    plain = model_with(L.ProxyAnchorLoss(num_classes=n))
    plain.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    assert (n, D) in [tuple(v.shape) for v in plain.optimizer.variables]
    assert any(v is plain.loss.proxies for v in plain.main_trainable_variables)


def test_compile_refuses_memory_iaa_and_a_stray_proxy_optimizer():
    from tfdml.memory import CrossBatchMemory

    model = DMLModel(tiny_encoder(8, 8, 1, D), memory=CrossBatchMemory(8, D))
    with pytest.raises(ValueError, match="memory bank"):
        model.compile(loss=L.ArcFaceLoss(num_classes=C))
    model = DMLModel(tiny_encoder(8, 8, 1, D))
    with pytest.raises(ValueError, match="proxy_optimizer"):
        model.compile(loss=L.MultiSimilarityLoss(), proxy_optimizer="adam")


# -- train.py configs --

SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")


def load(*overrides):
    return config_lib.load(SMOKE, overrides=list(overrides))


def test_proxy_lr_multiplier_builds_a_scaled_optimizer():
    cfg = load(
        "loss.name=ProxyAnchorLoss",
        "optimizer.proxy_lr_multiplier=100",
        "optimizer.schedule=multistep",
        "optimizer.milestones=[1, 2]",
    )
    build_lib.validate_objects(cfg)
    main = build_lib.build_optimizer(cfg)
    proxy = build_lib.build_proxy_optimizer(cfg)
    assert type(proxy) is type(main)
    for step in (0, 4, 8):  # steps_per_epoch 4: every schedule segment
        np.testing.assert_allclose(
            float(proxy._learning_rate(step)),
            100 * float(main._learning_rate(step)),
            rtol=1e-6,
        )
    assert build_lib.build_proxy_optimizer(load()) is None


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["optimizer.proxy_lr_multiplier=10"], "optimizer.proxy_lr_multiplier"),
        (
            ["loss.name=ArcFaceLoss", "optimizer.proxy_lr_multiplier=0"],
            "optimizer.proxy_lr_multiplier",
        ),
        (["loss.name=ArcFaceLoss", "loss.num_classes=3"], "loss.num_classes"),
        (["loss.name=ArcFaceLoss", "memory.size=64"], "memory.size"),
        (["loss.name=ArcFaceLoss", "miner.name=AllPairsMiner"], "miner"),
        (["loss.name=ArcFaceLoss", "loss.margin=-1"], "loss.margin"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(config_lib.ConfigError) as e:
        build_lib.validate_objects(load(*overrides))
    assert e.value.key == key


def test_train_py_rejects_before_touching_the_run_folder(tmp_path):
    import train

    run_dir = tmp_path / "run"
    status = train.main(
        [
            "--config",
            SMOKE,
            "--set",
            f"train.run_dir={run_dir}",
            "--set",
            "optimizer.proxy_lr_multiplier=100",
        ]
    )
    assert status == 2
    assert not run_dir.exists()


@pytest.mark.slow
def test_train_py_run_with_the_proxy_anchor_config(tmp_path):
    import train
    from tfdml.training import run_dir as run_dir_lib

    run_dir = tmp_path / "run"
    args = [
        "--config",
        SMOKE,
        "--set",
        f"train.run_dir={run_dir}",
        "--set",
        "train.verbose=0",
        "--set",
        "train.deterministic=false",
        "--set",
        "loss.name=ProxyAnchorLoss",
        "--set",
        "optimizer.proxy_lr_multiplier=100",
        "--set",
        "train.epochs=2",
    ]
    assert train.main(args) == 0
    state = run_dir_lib.read_state(str(run_dir))
    assert state["epoch"] == 2 and state["done"]
    cfg = run_dir_lib.read_config(str(run_dir))
    assert cfg["loss"]["name"] == "ProxyAnchorLoss"
    # config.yaml describes the proxies' optimizer: the main one's class at
    # learning_rate x proxy_lr_multiplier.
    objects = run_dir_lib.read_document(str(run_dir))["objects"]
    main, proxy = objects["optimizer"], objects["proxy_optimizer"]
    assert proxy["class_name"] == main["class_name"] == "Adam"
    assert proxy["lr_multiplier"] == 100
    assert main["config"]["learning_rate"] == pytest.approx(1e-3)
    assert proxy["config"]["learning_rate"] == pytest.approx(0.1)
    assert "proxies" in proxy["updates"]
    rest = {k for k in main["config"] if k not in ("learning_rate", "name")}
    assert {k: proxy["config"][k] for k in rest} == {
        k: main["config"][k] for k in rest
    }
    # The checkpoint holds the proxies and both optimizers' slots.
    ckpt = os.path.join(run_dir, "checkpoints", state["checkpoint"])
    names = [n for n, _ in tf.train.list_variables(ckpt)]
    shapes = dict(tf.train.list_variables(ckpt))
    n_train = build_lib.validate(load()).data.num_train_classes
    proxies = [n for n in names if shapes[n] == [n_train, 16]]
    # the proxies and their two Adam moments in the proxy optimizer; none
    # in the main optimizer (train.py builds it without the proxies)
    assert len(proxies) == 3, shapes


MIRRORED = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from tfdml.losses import ProxyAnchorLoss
    from tfdml.models import DMLModel

    def run(strategy):
        with strategy.scope():
            inp = keras.Input((5,))
            raw = keras.layers.Dense(4, name="raw")(inp)
            emb = keras.layers.UnitNormalization(name="embeddings")(raw)
            enc = keras.Model(inp, {"embeddings": emb, "raw": raw})
            rng = np.random.default_rng(1)
            for v in enc.trainable_variables:
                v.assign(rng.normal(size=v.shape).astype("float32"))
            loss = ProxyAnchorLoss(num_classes=4)
            model = DMLModel(enc)
            model.compile(
                optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                proxy_optimizer=keras.optimizers.SGD(1.0, momentum=0.9),
                loss=loss, jit_compile=False)
            p0 = rng.normal(size=(4, 4)).astype("float32")
            loss.proxies.assign(p0)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(24, 5)).astype("float32")
        y = (np.arange(24) % 4).astype("int32")
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        hist = model.fit(ds, epochs=1, verbose=0)
        return [p0] + [v.numpy() for v in enc.trainable_variables] + [
            loss.proxies.numpy()], hist.history["loss"][-1]

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert mirrored.num_replicas_in_sync == 2
    w2, l2 = run(mirrored)
    w1, l1 = run(tf.distribute.get_strategy())
    np.savez(sys.argv[1], *w1, *w2, loss=[l1, l2])
    """
)


@pytest.mark.slow
@pytest.mark.distributed
def test_mirrored_two_replicas_equal_one_device(tmp_path):
    out = tmp_path / "out.npz"
    proc = subprocess.run(
        [sys.executable, "-c", MIRRORED, str(out)],
        cwd=ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    got = np.load(out)
    arrays = [got[f"arr_{i}"] for i in range(len(got.files) - 1)]
    half = len(arrays) // 2
    single, mirrored = arrays[:half], arrays[half:]
    for a, b in zip(single, mirrored):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["loss"][1], got["loss"][0], rtol=1e-5)
    # training moved the proxies: the comparison is not of initial values
    assert np.abs(single[-1] - single[0]).max() > 1e-2


def _train_cmd(run_dir):
    return [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--config",
        SMOKE,
        *sum(
            (
                ["--set", o]
                for o in (
                    f"train.run_dir={run_dir}",
                    "train.epochs=3",
                    "train.steps_per_epoch=20",
                    "train.deterministic=true",
                    "train.verbose=0",
                    "eval.plots=false",
                    "loss.name=ProxyAnchorLoss",
                    "optimizer.proxy_lr_multiplier=100",
                )
            ),
            [],
        ),
    ]


@pytest.mark.slow
def test_resume_after_kill_9_matches_uninterrupted_run(tmp_path):
    """The proxies and the proxy optimizer's state come back on resume:
    the resumed run ends with the uninterrupted run's weights."""
    import csv
    import signal
    import time

    from tfdml.training import run_dir as run_dir_lib

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    a, b = tmp_path / "a", tmp_path / "b"
    done = subprocess.run(
        _train_cmd(a), env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.Popen(
        _train_cmd(b),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state_file = b / run_dir_lib.CHECKPOINT_DIR / run_dir_lib.STATE_FILE
    deadline = time.time() + 600
    while not state_file.exists() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = run_dir_lib.read_state(str(b))
    assert killed_at is not None and 1 <= killed_at["epoch"] < 3
    again = subprocess.run(
        _train_cmd(b), env=env, capture_output=True, text=True, timeout=900
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"after epoch {killed_at['epoch']}" in again.stdout

    def history(run):
        with open(run / "history.csv", newline="") as f:
            return list(csv.DictReader(f))

    assert history(a) == history(b)
    wa = keras.saving.load_model(a / "final_encoder.keras", compile=False)
    wb = keras.saving.load_model(b / "final_encoder.keras", compile=False)
    for x, y in zip(wa.get_weights(), wb.get_weights()):
        np.testing.assert_array_equal(x, y)


def test_keras_file_keeps_the_proxies(tmp_path):
    model = model_with(L.ArcFaceLoss(num_classes=C))
    x, y = data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.loss, L.ArcFaceLoss)
    np.testing.assert_array_equal(
        loaded.loss.proxies.numpy(), model.loss.proxies.numpy()
    )


@pytest.mark.parametrize("name", ["ProxyAnchorLoss", "SubCenterArcFaceLoss"])
def test_fit_under_xla_with_a_proxy_optimizer(name):
    model = model_with(
        {"name": name, "num_classes": C},
        proxy_optimizer=keras.optimizers.Adam(0.1),
        jit_compile=True,
    )
    assert model.jit_compile
    before = model.loss.proxies.numpy().copy()
    x, y = data()
    hist = model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    assert np.all(np.isfinite(hist.history["loss"]))
    assert not np.allclose(model.loss.proxies.numpy(), before)
