"""``benchmarks/vs_pml.py --speed`` (tiny sizes; no timing is checked).

The tfdml side runs every part in fresh worker processes; the PML side only
where the peer venv exists (``$PML_PYTHON`` or ``.venv-pml/bin/python``, as
the script's docstring installs it): tfdml never needs torch.
"""

import importlib.util
import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PML_PYTHON = os.environ.get("PML_PYTHON") or os.path.join(
    ROOT, ".venv-pml", "bin", "python"
)
# tiny: one eval set of 20 x 57 points, 256 images, one timed step
TINY = [
    "--speed",
    "--quick",
    "--rounds",
    "1",
    "--repeats",
    "1",
    "--eval-sets",
    "easy",
    "--eval-classes",
    "20",
    "--embed-n",
    "256",
    "--train-steps",
    "1",
]


def _load(name):
    path = os.path.join(ROOT, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _table(path):
    lines = [r for r in path.read_text().splitlines() if r.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in r.strip("|").split("|")] for r in lines[2:]]
    return head, rows


@pytest.mark.slow
def test_speed_tfdml_side_every_part(tmp_path):
    vs = _load("vs_pml")
    out = tmp_path / "out"
    rc = vs.main([*TINY, "--skip-pml", "--out", str(out), "--name", "t"])
    assert rc == 0
    head, rows = _table(out / "t.md")
    speed = vs_speed()
    assert head == list(speed.COLUMNS)
    cases = {(r[0], r[1]) for r in rows}
    for loss in ("ms", "contrastive", "triplet", "xbm"):
        assert ("losses", f"{loss} B=128") in cases
    assert ("eval", "import") in cases
    assert ("eval", "easy (N=1,140) first call") in cases
    assert ("eval", "easy (N=1,140) warm call") in cases
    assert ("embed", "embed 256 images, warm call") in cases
    assert ("train", "train step (B=128)") in cases
    for r in rows:
        assert float(r[2]) > 0  # tfdml seconds
        assert r[3] == r[4] == r[6] == r[7] == "-"  # no PML columns
    data = json.loads((out / "t.json").read_text())
    meta = data["meta"]
    assert meta["rounds"] == 1 and meta["quick"]
    assert meta["versions"]["tfdml"]["TF_ENABLE_ONEDNN_OPTS"] is not None
    assert len(meta["load_before"]) == len(meta["load_after"]) == 3
    assert meta["machine"]["cores"] >= 1
    assert data["columns"] == list(speed.COLUMNS)
    assert data["mismatches"] == []
    assert meta["modes"]["losses/tfdml"].startswith("tf.function(")
    (ev,) = [
        r
        for r in data["rows"]
        if r["part"] == "eval" and r["case"].endswith("first call")
    ]
    assert 0.5 < ev["metrics"]["tfdml"][0]["map@r"] <= 1.0
    text = (out / "t.md").read_text()
    assert "TensorFlow" in text and "Load average" in text


def vs_speed():
    import sys

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import speed_pml
    finally:
        sys.path.pop(0)
    return speed_pml


def test_speed_combine_ratios_and_agreement():
    sp = vs_speed()
    m = {"precision@1": 1.0, "r_precision": 0.5, "map@r": 0.25}
    off = dict(m, **{"map@r": 0.2502})

    def res(seconds, metrics=m):
        return {
            "cases": [{"case": "c", "seconds": seconds, "metrics": metrics}],
            "mode": "x",
        }

    records = [
        (0, "tfdml", "eval", "easy", res(1.0)),
        (0, "pml", "eval", "easy", res(2.0)),
        (1, "pml", "eval", "easy", res(1.0, off)),
        (1, "tfdml", "eval", "easy", res(3.0)),
    ]
    (row,) = sp.combine(records, ["tfdml", "pml"], 2)
    assert row["tfdml"] == [1.0, 3.0] and row["pml"] == [2.0, 1.0]
    np.testing.assert_allclose(row["ratio"], [0.5, 3.0])
    assert row["tfdml_median"] == 2.0 and row["pml_median"] == 1.5
    assert row["median_ratio"] == pytest.approx(1.75)
    (bad,) = sp.agreement([row])
    assert "map@r" in bad and "0.250200" in bad
    table = sp.markdown([row], ["tfdml", "pml"])
    assert "| 1 / 3 | 2 / 1 | 0.50 / 3.00 | 2 | 1.5 | 1.75 |" in table


@pytest.mark.skipif(
    not os.path.exists(PML_PYTHON), reason="no PML venv ($PML_PYTHON)"
)
@pytest.mark.slow
def test_speed_with_pml(tmp_path):
    vs = _load("vs_pml")
    out = tmp_path / "out"
    rc = vs.main(
        [
            *TINY,
            "--parts",
            "losses,eval",
            "--losses",
            "ms,xbm",
            "--pml-python",
            PML_PYTHON,
            "--out",
            str(out),
            "--name",
            "t",
        ]
    )
    assert rc == 0  # the metrics agree to 1e-4
    _, rows = _table(out / "t.md")
    for r in rows:
        assert float(r[3]) > 0 and float(r[7]) > 0  # PML s, median ratio
    data = json.loads((out / "t.json").read_text())
    assert data["meta"]["versions"]["pml"]["pytorch_metric_learning"]
