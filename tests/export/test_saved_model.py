"""Export round trip: write a run, export, reload in fresh processes."""

import importlib.util
import io
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.conftest import tiny_run_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
VENV_BIN = os.path.dirname(sys.executable)
H, W, C, D, N, K = 8, 8, 3, 6, 40, 5

# Runs in a fresh interpreter: plain TensorFlow (+ scann for that variant),
# never tfdml. Calls every signature and saves the outputs.
LOADER = r"""
import json, sys
import numpy as np
import tensorflow as tf
path, inputs, out, use_scann = sys.argv[1:5]
if use_scann == "1":
    import scann  # noqa: F401  registers the Scann ops
m = tf.saved_model.load(path)
z = np.load(inputs, allow_pickle=True)
res = {"signatures": sorted(m.signatures)}
arr = {}
for bs in (1, 5):
    img = tf.constant(z["images"][:bs])
    byt = tf.constant(list(z["bytes"][:bs]))
    emb = tf.constant(z["queries"][:bs])
    s = m.signatures
    arr[f"emb_{bs}"] = s["serving_default"](images=img)["embeddings"].numpy()
    arr[f"bytes_{bs}"] = s["embed_bytes"](image_bytes=byt)["embeddings"].numpy()
    for name, kw in (
        ("search", dict(embeddings=emb, k=tf.constant(7))),
        ("search_default", dict(embeddings=emb)),
        ("embed_and_search", dict(images=img, k=tf.constant(7))),
        ("embed_and_search_default", dict(images=img)),
    ):
        o = s[name](**kw)
        arr[f"{name}_ids_{bs}"] = o["ids"].numpy().astype(str)
        arr[f"{name}_scores_{bs}"] = o["scores"].numpy()
if use_scann != "1":
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.framework import op_def_registry
    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString(open(path + "/saved_model.pb", "rb").read())
    ops = set()
    for mg in sm.meta_graphs:
        ops |= {n.op for n in mg.graph_def.node}
        for f in mg.graph_def.library.function:
            ops |= {n.op for n in f.node_def}
    res["ops"] = sorted(ops)
    res["unregistered"] = sorted(
        o for o in ops if op_def_registry.get(o) is None
    )
res["tfdml_imported"] = any(k.startswith("tfdml") for k in sys.modules)
res["scann_imported"] = "scann" in sys.modules
np.savez(out + ".npz", **arr)
json.dump(res, open(out + ".json", "w"))
"""


def _png(a):
    b = io.BytesIO()
    Image.fromarray(a).save(b, format="PNG")
    return b.getvalue()


def _jpeg(a):
    b = io.BytesIO()
    Image.fromarray(a).save(b, format="JPEG", quality=95)
    return b.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    run = tiny_run_dir(tmp, H, W, C, D)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (N, H, W, C), dtype=np.uint8)
    y = np.arange(N) % 4
    ids = np.array([f"img-{i:03d}" for i in range(N)])
    np.savez(tmp / "gallery.npz", X=x, y=y, ids=ids)
    spec = importlib.util.spec_from_file_location(
        "export_cli", os.path.join(ROOT, "export", "export.py")
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp / "models"
    written = cli.main(
        [
            "--run",
            str(run),
            "--out",
            str(out),
            "--gallery",
            str(tmp / "gallery.npz"),
            "--name",
            "dml",
            "--version",
            "3",
            "--index",
            "both",
            "--k",
            str(K),
        ]
    )
    # In-process references: the loaded encoder and exact NumPy search.
    enc = keras.saving.load_model(run / "best_encoder.keras", compile=False)
    gal = np.asarray(enc(x.astype("float32") / 255.0)["embeddings"])
    # Query images of another size, sent as PNG (5) and JPEG (1) bytes.
    big = rng.integers(0, 256, (5, 12, 10, 3), dtype=np.uint8)
    byts = [_png(a) for a in big[:4]] + [_jpeg(big[4])]
    imgs = rng.random((5, H, W, C)).astype("float32")
    queries = np.asarray(enc(imgs)["embeddings"])
    np.savez(
        tmp / "inputs.npz",
        images=imgs,
        bytes=np.array(byts, dtype=object),
        queries=queries,
    )
    return dict(
        tmp=tmp,
        written=written,
        enc=enc,
        gal=gal,
        ids=ids,
        imgs=imgs,
        bytes=byts,
        queries=queries,
    )


def _reload(ex):
    """Both variants in parallel fresh processes -> {variant: (arr, json)}."""
    procs = {}
    for variant, scann in (("brute_force", "0"), ("scann", "1")):
        out = str(ex["tmp"] / f"out_{variant}")
        procs[variant] = (
            out,
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    LOADER,
                    ex["written"][variant],
                    str(ex["tmp"] / "inputs.npz"),
                    out,
                    scann,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
            ),
        )
    cli = subprocess.Popen(
        [
            os.path.join(VENV_BIN, "saved_model_cli"),
            "show",
            "--dir",
            ex["written"]["brute_force"],
            "--all",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    res = {}
    for variant, (out, p) in procs.items():
        log = p.communicate(timeout=300)[0].decode()
        assert p.returncode == 0, log
        res[variant] = (
            dict(np.load(out + ".npz")),
            json.load(open(out + ".json")),
        )
    show = cli.communicate(timeout=300)[0]
    assert cli.returncode == 0, show
    return res, show


def _expected_search(ex, q, k):
    s = q.astype(np.float64) @ ex["gal"].astype(np.float64).T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return ex["ids"][order], np.take_along_axis(s, order, 1)


def _decode_ref(ex):
    out = []
    for b in ex["bytes"]:
        img = tf.io.decode_image(b, channels=C, expand_animations=False)
        out.append(tf.image.resize(tf.cast(img, tf.float32), [H, W]) / 255.0)
    return np.asarray(ex["enc"](tf.stack(out))["embeddings"])


@pytest.mark.slow
def test_round_trip_fresh_process(exported):
    ex = exported
    assert ex["written"]["brute_force"].endswith(os.path.join("dml", "3"))
    assert ex["written"]["scann"].endswith(os.path.join("dml_scann", "3"))
    res, show = _reload(ex)
    ref_bytes = _decode_ref(ex)
    names = [
        "embed_and_search",
        "embed_and_search_default",
        "embed_bytes",
        "search",
        "search_default",
        "serving_default",
    ]
    for variant, (arr, info) in res.items():
        assert info["signatures"] == names, info
        assert not info["tfdml_imported"]
        assert info["scann_imported"] == (variant == "scann")
        for bs in (1, 5):
            np.testing.assert_allclose(
                arr[f"emb_{bs}"], ex["queries"][:bs], atol=1e-5
            )
            np.testing.assert_allclose(
                arr[f"bytes_{bs}"], ref_bytes[:bs], atol=1e-5
            )
            for name, k in (
                ("search", 7),
                ("search_default", K),
                ("embed_and_search", 7),
                ("embed_and_search_default", K),
            ):
                ids, sc = _expected_search(ex, ex["queries"][:bs], k)
                got_ids = arr[f"{name}_ids_{bs}"]
                assert got_ids.shape == (bs, k), (variant, name)
                np.testing.assert_array_equal(got_ids, ids, err_msg=name)
                np.testing.assert_allclose(
                    arr[f"{name}_scores_{bs}"], sc, atol=1e-5, err_msg=name
                )
    info = res["brute_force"][1]
    assert info["unregistered"] == [], info["unregistered"]
    assert not [o for o in info["ops"] if "Scann" in o]
    assert "TopKV2" in info["ops"] and "DecodeImage" in "".join(info["ops"])
    for name in names:
        assert f"signature_def['{name}']" in show, show[:2000]
    assert "Scann" not in show


def test_scann_graph_has_scann_ops(exported):
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    path = os.path.join(exported["written"]["scann"], "saved_model.pb")
    sm.ParseFromString(open(path, "rb").read())
    ops = {
        n.op
        for f in sm.meta_graphs[0].graph_def.library.function
        for n in f.node_def
    }
    assert {"Scann>ScannSearchBatched", "Scann>TensorsToScann"} <= ops


@pytest.fixture(scope="module")
def loaded(exported):
    import scann  # noqa: F401

    return {v: tf.saved_model.load(p) for v, p in exported["written"].items()}


BAD = [
    ("serving_default", dict(images=np.zeros((2, H, W), "float32")), "images"),
    (
        "serving_default",
        dict(images=np.zeros((2, H + 1, W, C), "float32")),
        "images",
    ),
    (
        "serving_default",
        dict(images=np.zeros((2, H, W, 1), "float32")),
        "images",
    ),
    ("embed_bytes", dict(image_bytes=[b"not an image"]), "image_bytes"),
    ("embed_bytes", dict(image_bytes=[[b"x"]]), "image_bytes"),
    ("embed_bytes", dict(image_bytes=[b"\x89PNG\r\n\x1a\ntruncated"]), "PNG"),
    ("search", dict(embeddings=np.zeros((D,), "float32"), k=3), "embeddings"),
    (
        "search",
        dict(embeddings=np.zeros((2, D + 1), "float32"), k=3),
        "embeddings",
    ),
    ("search", dict(embeddings=np.zeros((2, D), "float32"), k=0), "k"),
    ("search", dict(embeddings=np.zeros((2, D), "float32"), k=N + 1), "k"),
    ("search", dict(embeddings=np.zeros((2, D), "float32"), k=[3, 3]), "k"),
    (
        "search_default",
        dict(embeddings=np.zeros((2, 3), "float32")),
        "embeddings",
    ),
    (
        "embed_and_search",
        dict(images=np.zeros((2, H, W + 2, C), "float32"), k=3),
        "images",
    ),
    (
        "embed_and_search_default",
        dict(images=np.zeros((H, W, C), "float32")),
        "images",
    ),
]


@pytest.mark.parametrize("variant", ["brute_force", "scann"])
def test_bad_input_invalid_argument(loaded, variant):
    sigs = loaded[variant].signatures
    for name, kw, word in BAD:
        kw = {
            k: tf.constant(v, tf.int32 if k == "k" else None)
            for k, v in kw.items()
        }
        with pytest.raises(tf.errors.InvalidArgumentError, match=word):
            sigs[name](**kw)
    # Wrong dtypes are rejected by the signature itself.
    errors = (TypeError, ValueError, tf.errors.InvalidArgumentError)
    with pytest.raises(errors, match="float"):
        sigs["serving_default"](images=tf.zeros((1, H, W, C), tf.int32))
    with pytest.raises(errors, match="int32"):
        sigs["search"](embeddings=tf.zeros((1, D)), k=tf.constant(2.0))
    # A good call still works afterwards.
    out = sigs["search"](
        embeddings=tf.constant(exported_q(loaded)), k=tf.constant(N)
    )
    assert out["ids"].shape == (1, N)


def exported_q(loaded):
    return np.eye(D, dtype="float32")[:1]


def test_export_argument_errors(exported):
    from tfdml.export import export_saved_model

    enc = exported["enc"]
    with pytest.raises(ValueError, match="index"):
        export_saved_model(
            enc, "/nonexistent", database=exported["gal"], index="faiss"
        )
    with pytest.raises(ValueError, match="k"):
        export_saved_model(
            enc, str(exported["tmp"] / "x"), database=exported["gal"], k=N + 1
        )
    with pytest.raises(ValueError, match="database_ids"):
        export_saved_model(
            enc,
            str(exported["tmp"] / "x"),
            database=exported["gal"],
            database_ids=["a"],
        )
