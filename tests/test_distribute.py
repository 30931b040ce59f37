"""``tfdml.distribute.all_gather``: identity on one replica; under
MirroredStrategy (two logical CPUs, in a subprocess: logical devices must be
set before TensorFlow starts) the replicas' rows in replica order, with the
gradient flowing back to each replica's own rows."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from tfdml.distribute import all_gather

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_identity_without_strategy():
    x = tf.constant(np.arange(6, dtype=np.float32).reshape(3, 2))
    assert all_gather(None) is None
    assert all_gather(x) is x

    @tf.function
    def graph(v):
        return all_gather(v)

    np.testing.assert_array_equal(graph(x).numpy(), x.numpy())


SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from tfdml.distribute import all_gather
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    dist = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(x).batch(4))
    coef = tf.constant([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])

    @tf.function
    def step(v):
        with tf.GradientTape() as tape:
            tape.watch(v)
            g = all_gather(v)
            loss = tf.reduce_sum(g * coef)
        return g, tape.gradient(loss, v)

    g, grad = strategy.run(step, args=(next(iter(dist)),))
    local = strategy.experimental_local_results
    out = {
        "gathered": [t.numpy().tolist() for t in local(g)],
        "grad": [t.numpy().tolist() for t in local(grad)],
    }
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.slow
@pytest.mark.distributed
def test_mirrored_two_replicas():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-3000:]

    out = json.loads(lines[0][len("RESULT") :])
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    # every replica sees the global batch, replica 0's rows first
    for gathered in out["gathered"]:
        np.testing.assert_array_equal(gathered, x)
    # d sum(g * coef) / d v: each replica's own rows of coef, summed over the
    # two replicas' losses (each replica's loss uses every row)
    coef = np.array([[1, 2], [3, 4], [5, 6], [7, 8]], np.float32)
    np.testing.assert_allclose(out["grad"][0], 2 * coef[:2])
    np.testing.assert_allclose(out["grad"][1], 2 * coef[2:])
