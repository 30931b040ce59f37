"""IAA under MirroredStrategy (2 logical CPUs) equals one device.

With a fixed noise seed the synthetic rows are identical on every replica
(stateless noise keyed by the step counter), so two replicas must train
exactly like one device on the global batch.

Two replicas still round differently from one device (each encodes half the
batch: ~1e-8 in the weights), so the set-up must keep every positive pair
away from the MS loss's duplicate-positive cutoff ``S < 1 - 1e-5``. A
memory of 24 slots over 32 images used to hold each image's own embedding
from two steps earlier, one float32 ulp from the cutoff: one flipped pair
moved the epoch-3 loss from 1.16277 to 1.16111 on a loaded 2-core machine
(issue 12, item 8).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SCRIPT = os.path.join(os.path.dirname(__file__), "iaa_dist_train.py")


def launch(mode, out, *extra):
    return subprocess.Popen(
        [sys.executable, SCRIPT, mode, str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc, out, timeout=300):
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError(f"timed out:\n{output[-3000:]}") from None
    assert proc.returncode == 0, output[-3000:]
    return dict(np.load(out))


def test_mirrored_iaa_equals_single_device(tmp_path):
    outs = {m: tmp_path / f"{m}.npz" for m in ("single", "mirrored")}
    procs = {m: launch(m, out) for m, out in outs.items()}
    single = finish(procs["single"], outs["single"])
    mirrored = finish(procs["mirrored"], outs["mirrored"])
    assert single["replicas"] == 1 and mirrored["replicas"] == 2
    # Epochs 2 and 3 synthesise (2 steps each); the estimate is non-trivial.
    assert single["step"] == mirrored["step"] == 4
    assert single["variance"].max() > 0
    # No positive pair sits near the loss's cutoff (a discontinuity).
    for run in (single, mirrored):
        assert run["cutoff_gap"] > 1e-4, run["cutoff_gap"]
    for key in single:
        if key in ("replicas", "cutoff_gap"):
            continue
        np.testing.assert_allclose(
            mirrored[key], single[key], rtol=1e-4, atol=1e-5, err_msg=key
        )
    # Training moved the weights (the comparison is not vacuous).
    assert not np.allclose(single["loss"][0], single["loss"][-1])
