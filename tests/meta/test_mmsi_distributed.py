"""MMSIModel under MirroredStrategy: two logical CPUs vs one device."""

import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

HERE = os.path.dirname(os.path.abspath(__file__))


def test_two_replicas_match_one(tmp_path):
    outs = []
    for nrep in (1, 2):
        out = tmp_path / f"rep{nrep}.npz"
        proc = subprocess.run(
            [sys.executable, os.path.join(HERE, "dist_mmsi.py"), str(nrep),
             str(out)],
            capture_output=True,
            text=True,
            timeout=240,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(np.load(out))
    one, two = outs
    assert float(one["moved"]) > 1e-3 and one["gate"][-1] == 1.0
    for key in one.files:
        np.testing.assert_allclose(
            one[key].astype(float), two[key].astype(float), atol=1e-5,
            err_msg=key,
        )  # fmt: skip
