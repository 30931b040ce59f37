"""Export validates the gallery before anything is written (issue 12, 4).

Each bad gallery is a clear ``ValueError`` from the Python API (before the
gallery is embedded and before the output folder exists) and, through
``export/export.py --gallery G.npz``, a message and exit status 2.
"""

import importlib.util
import os

import numpy as np
import pytest

from tests.conftest import tiny_encoder
from tests.conftest import tiny_run_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
H, W, C, D, N = 8, 8, 3, 6, 10


def _uint8(n=N):
    return np.random.default_rng(0).integers(0, 256, (n, H, W, C), np.uint8)


def _float01(n=N):
    return _uint8(n).astype(np.float32) / 255.0


def _with(x, value):
    x = x.copy()
    x[(3,) + (1,) * (x.ndim - 1)] = value
    return x


def _db(n=N, d=D):
    e = np.random.default_rng(1).normal(size=(n, d)).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


LABELS = np.arange(N) % 3
IDS = np.array([f"img-{i}" for i in range(N)])

# name -> (export_saved_model keyword arguments, regex of the message)
API_CASES = {
    "labels_longer": (
        dict(gallery_images=_float01(), database_labels=np.arange(N + 2)),
        rf"labels.*{N + 2}.*{N}",
    ),
    "labels_shorter": (
        dict(gallery_images=_float01(), database_labels=np.arange(N - 2)),
        rf"labels.*{N - 2}.*{N}",
    ),
    "float_0_255": (
        dict(
            gallery_images=_uint8().astype(np.float32), database_labels=LABELS
        ),
        r"uint8.*\[0, 1\]",
    ),
    "float_negative": (
        dict(gallery_images=_float01() - 0.5, database_labels=LABELS),
        r"uint8.*\[0, 1\]",
    ),
    "nan_pixels": (
        dict(gallery_images=_with(_float01(), np.nan), database_labels=LABELS),
        r"NaN",
    ),
    "inf_pixels": (
        dict(gallery_images=_with(_float01(), np.inf), database_labels=LABELS),
        r"NaN or Inf",
    ),
    "float_labels": (
        dict(gallery_images=_float01(), database_labels=LABELS.astype(float)),
        r"labels.*integer",
    ),
    "empty_gallery": (
        dict(
            gallery_images=np.zeros((0, H, W, C), np.float32),
            database_labels=np.zeros(0, np.int64),
        ),
        r"empty",
    ),
    "ids_length": (
        dict(gallery_images=_float01(), database_ids=IDS[:-1]),
        rf"ids.*{N - 1}.*{N}",
    ),
    "nan_database": (
        dict(database=_with(_db(), np.nan)),
        r"database.*NaN",
    ),
    "database_labels_length": (
        dict(database=_db(), database_labels=np.arange(N + 1)),
        rf"labels.*{N + 1}.*{N}",
    ),
    "database_dimension": (
        dict(database=_db(d=D + 1)),
        rf"database.*{D + 1}.*{D}",
    ),
}


@pytest.fixture(scope="module")
def encoder():
    import keras

    keras.utils.set_random_seed(0)
    return tiny_encoder(H, W, C, D)


@pytest.mark.parametrize("case", list(API_CASES))
def test_bad_gallery_is_value_error_before_writing(
    encoder, tmp_path, monkeypatch, case
):
    from tfdml.export import export_saved_model
    from tfdml.export import saved_model

    kwargs, pattern = API_CASES[case]
    embedded = []
    real = saved_model.embed_images

    def spy(*a, **k):
        embedded.append(1)
        return real(*a, **k)

    monkeypatch.setattr(saved_model, "embed_images", spy)
    out = tmp_path / "models"
    with pytest.raises(ValueError, match=pattern):
        export_saved_model(encoder, str(out), **kwargs)
    assert not out.exists()
    assert not embedded, "validated only after embedding the gallery"


# name -> (npz arrays, the message regex); written as G.npz for the CLI.
CLI_CASES = {
    "labels_longer": (dict(X=_uint8(), y=np.arange(N + 2)), r"labels"),
    "labels_shorter": (dict(X=_uint8(), y=np.arange(N - 2)), r"labels"),
    "float_0_255": (
        dict(X=_uint8().astype(np.float32), y=LABELS),
        r"uint8.*\[0, 1\]",
    ),
    "nan_pixels": (dict(X=_with(_float01(), np.nan), y=LABELS), r"NaN"),
    "float_labels": (dict(X=_uint8(), y=LABELS + 0.5), r"labels.*integer"),
    "empty_gallery": (
        dict(X=np.zeros((0, H, W, C), np.uint8), y=np.zeros(0, np.int64)),
        r"empty",
    ),
    "ids_length": (dict(X=_uint8(), y=LABELS, ids=IDS[:3]), r"ids"),
    "uint16_range": (
        dict(X=_uint8().astype(np.uint16) * 256, y=LABELS),
        r"0\.\.255",
    ),
    "missing_y": (dict(X=_uint8()), r"'y'"),
    "not_an_npz": (None, r"--gallery"),
}


def _cli():
    spec = importlib.util.spec_from_file_location(
        "export_cli_validation", os.path.join(ROOT, "export", "export.py")
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run_dir(tmp_path_factory.mktemp("val"), H, W, C, D)


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_gallery_exits_2(run_dir, tmp_path, capsys, case):
    arrays, pattern = CLI_CASES[case]
    gallery = tmp_path / "G.npz"
    if arrays is None:
        gallery.write_text("this is not a zip file\n")
    else:
        np.savez(gallery, **arrays)
    out = tmp_path / "models"
    argv = ["--run", str(run_dir), "--out", str(out), "--gallery", str(gallery)]
    with pytest.raises(SystemExit) as e:
        _cli().main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    assert "error" in err.lower()
    import re

    assert re.search(pattern, err), err
    assert not out.exists()


def test_cli_good_gallery_still_exports(run_dir, tmp_path):
    gallery = tmp_path / "G.npz"
    np.savez(gallery, X=_uint8(), y=LABELS)
    out = tmp_path / "models"
    argv = ["--run", str(run_dir), "--out", str(out), "--gallery", str(gallery)]
    written = _cli().main(argv)
    assert os.path.isdir(written["brute_force"])
