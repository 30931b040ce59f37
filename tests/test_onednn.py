"""oneDNN on by default (tfdml/_cpu.py): same results, entry points, warning.

TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, at import, so the numeric
comparison runs in two subprocesses (the variable forced to 0 and to 1:
this must hold on AVX-512 machines, where TF turns oneDNN on by itself, and
on AVX2 ones, where it does not).
"""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from tfdml import _cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = _cpu.ENV

# Loss value + gradient, retrieval metrics and a conv net forward/backward
# on fixed inputs and weights. argv: output .npz. With argv[2] == "unset",
# TensorFlow is imported with the variable as given and the variable is then
# removed before ``import tfdml``: TF runs without oneDNN and the user did
# not ask for that, so ``import tfdml`` must warn (once).
NUMERIC_PROBE = r"""
import os
import sys

import numpy as np
import tensorflow as tf
from tensorflow.python.util import _pywrap_util_port

if sys.argv[2] == "unset":
    del os.environ["TF_ENABLE_ONEDNN_OPTS"]
import tfdml  # noqa: E402
import tfdml.eval  # noqa: E402
import tfdml.losses  # noqa: E402
import tfdml.models  # noqa: E402

print("IMPORTED", file=sys.stderr, flush=True)
tfdml._cpu.check_onednn()  # must not warn a second time

out = {"mkl": np.array(_pywrap_util_port.IsMklEnabled())}
rng = np.random.default_rng(0)
emb = rng.normal(size=(64, 32)).astype(np.float32)
emb /= np.linalg.norm(emb, axis=1, keepdims=True)
labels = np.repeat(np.arange(8), 8).astype(np.int32)
for name, loss in (
    ("ms", tfdml.losses.MultiSimilarityLoss()),
    ("contrastive", tfdml.losses.ContrastiveLoss()),
):
    x = tf.constant(emb)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = loss(labels, x)
    out[name] = value.numpy()
    out[name + "_grad"] = tape.gradient(value, x).numpy()

centers = rng.normal(size=(20, 16))
y = np.repeat(np.arange(20), 15)
points = (centers[y] + 1.5 * rng.normal(size=(len(y), 16))).astype(np.float32)
metrics = tfdml.eval.retrieval_metrics(points, y)
for k, v in metrics.items():
    if np.ndim(v) == 0 and isinstance(v, (int, float, np.number)):
        out["metric/" + k] = np.float64(v)

net = tfdml.models.small_cnn(input_shape=(16, 16, 3), filters=(8, 16))
for w in net.weights:
    v = rng.normal(size=w.shape) * 0.3
    if "variance" in w.path:
        v = np.abs(v) + 0.5
    w.assign(v.astype(np.float32))
images = tf.constant(rng.uniform(size=(4, 16, 16, 3)).astype(np.float32))
with tf.GradientTape() as tape:
    tape.watch(images)
    feats = net(images, training=False)
    scalar = tf.reduce_sum(feats**2)
out["conv"] = feats.numpy()
out["conv_grad"] = tape.gradient(scalar, images).numpy()
np.savez(sys.argv[1], **out)
"""


def _python(code, *args, env=None):
    env = dict(os.environ if env is None else env, TF_CPP_MIN_LOG_LEVEL="2")
    env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _numeric_run(tmp_path, value, mode):
    env = dict(os.environ, **{ENV: value})
    path = str(tmp_path / f"onednn_{value}_{mode}.npz")
    proc = _python(NUMERIC_PROBE, path, mode, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(path) as f:
        return {k: f[k] for k in f.files}, proc.stderr


@pytest.mark.slow
def test_results_match_with_and_without_onednn(tmp_path):
    # "off" also checks the warning: TF imported without oneDNN, the
    # variable not set when tfdml is imported.
    off, off_err = _numeric_run(tmp_path, "0", "unset")
    on, on_err = _numeric_run(tmp_path, "1", "keep")
    assert not off.pop("mkl")
    if not on.pop("mkl"):
        pytest.skip("this TensorFlow build has no oneDNN")

    # once, and by ``import tfdml`` itself
    assert off_err.count("OneDNNWarning") == 1, off_err[-3000:]
    assert off_err.index("OneDNNWarning") < off_err.index("IMPORTED")
    assert f"set {ENV}=1 before TensorFlow is imported" in off_err
    assert "OneDNNWarning" not in on_err, on_err[-3000:]

    assert off.keys() == on.keys()
    assert {"ms", "ms_grad", "contrastive", "conv", "conv_grad"} <= set(off)
    assert any(k.startswith("metric/") for k in off)
    for k in off:
        a, b = off[k], on[k]
        assert np.all(np.isfinite(a)), k
        if k.startswith("metric/"):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=k)
        else:
            scale = float(np.max(np.abs(b)))
            np.testing.assert_allclose(
                a, b, rtol=1e-4, atol=1e-5 * scale, err_msg=k
            )


# Runs each entry point with ``--help`` (module code up to the argparse
# exit). TensorFlow and Keras imports are stopped and record the variable
# at that moment: it must be set *before* TensorFlow is imported.
ENTRY_PROBE = r"""
import json
import os
import runpy
import sys

ENV = "TF_ENABLE_ONEDNN_OPTS"
import tfdml  # noqa: E402,F401  (its own default must not mask a script's)


class Stop(BaseException):
    pass


seen = []


class StopTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras"):
            seen.append(os.environ.get(ENV))
            raise Stop
        return None


sys.meta_path.insert(0, StopTensorFlow())
results = {}
for entry in sys.argv[1:]:
    for user in (None, "0"):
        os.environ.pop(ENV, None)
        if user is not None:
            os.environ[ENV] = user
        seen.clear()
        sys.argv = [entry, "--help"]
        try:
            if entry.endswith(".py"):
                runpy.run_path(entry, run_name="__main__")
            else:
                runpy.run_module(entry, run_name="__main__", alter_sys=True)
        except (Stop, SystemExit):
            pass
        value = seen[0] if seen else os.environ.get(ENV)
        results.setdefault(entry, []).append(value)
print("RESULTS " + json.dumps(results))
"""

# These time tfdml in worker processes and set the variable for them.
WORKER_SCRIPTS = {"vs_pml.py", "speed_pml.py"}
ENTRY_POINTS = [
    "train.py",
    "export/export.py",
    "tfdml.demo",
] + sorted(
    f"benchmarks/{f}"
    for f in os.listdir(os.path.join(ROOT, "benchmarks"))
    # _common.py is the scripts' shared module, not an entry point
    if f.endswith(".py") and f not in WORKER_SCRIPTS and f[0] != "_"
)


def test_entry_points_enable_onednn_before_tensorflow():
    env = {k: v for k, v in os.environ.items() if k != ENV}
    proc = _python(ENTRY_PROBE, *ENTRY_POINTS, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [r for r in proc.stdout.splitlines() if r.startswith("RESULTS ")]
    results = json.loads(line[-1][len("RESULTS ") :])
    # unset -> "1" before TensorFlow; the user's "0" is kept
    assert results == {e: ["1", "0"] for e in ENTRY_POINTS}


def test_enable_onednn_keeps_the_users_value(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert _cpu.enable_onednn() == "1" and os.environ[ENV] == "1"
    monkeypatch.setenv(ENV, "0")
    assert _cpu.enable_onednn() == "0" and os.environ[ENV] == "0"


def test_import_tfdml_does_not_import_tensorflow():
    # Entry points import tfdml._cpu before TensorFlow; this must stay so.
    code = (
        "import os, sys; os.environ.pop('TF_ENABLE_ONEDNN_OPTS', None)\n"
        "import tfdml, tfdml._cpu\n"
        "assert 'tensorflow' not in sys.modules, 'tfdml imported TF'\n"
        "print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'))"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "1"


def test_check_onednn_policy(monkeypatch):
    """In process, oneDNN faked off: warn once; not when the user chose 0
    or a GPU is visible."""
    from tensorflow.python.util import _pywrap_util_port

    monkeypatch.setattr(_pywrap_util_port, "IsMklEnabled", lambda: False)
    monkeypatch.setattr(_cpu, "_warned", False)
    monkeypatch.setattr(_cpu, "_has_gpu", lambda: False)

    def warned():
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            returned = _cpu.check_onednn()
        hits = [x for x in w if issubclass(x.category, _cpu.OneDNNWarning)]
        assert returned == bool(hits)
        return len(hits)

    for chosen in ("0", "false", "FALSE"):
        monkeypatch.setenv(ENV, chosen)
        assert warned() == 0
    monkeypatch.delenv(ENV)
    monkeypatch.setattr(_cpu, "_has_gpu", lambda: True)
    assert warned() == 0
    monkeypatch.setattr(_cpu, "_has_gpu", lambda: False)
    assert warned() == 1
    assert warned() == 0  # once per process
    monkeypatch.setattr(_cpu, "_warned", False)
    monkeypatch.setattr(_pywrap_util_port, "IsMklEnabled", lambda: True)
    assert warned() == 0
