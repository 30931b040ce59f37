"""The serving clients against stand-ins for TF-Serving.

REST: a stub HTTP server. gRPC: an in-process ``grpc.server`` whose
``PredictionService.Predict`` serves a real tfdml export the way TF-Serving
does (plain ``tf.saved_model.load``, the named signature, errors as
``INVALID_ARGUMENT``).
"""

import base64
import importlib.util
import json
import os
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler
from http.server import HTTPServer

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tests.conftest import tiny_run_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
H, W, C, D, N, K = 8, 8, 3, 6, 12, 4


def _load(name, folder=("export", "serving")):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, *folder, f"{name}.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rest_client_against_stub(tmp_path):
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(
                self.rfile.read(int(self.headers["Content-Length"]))
            )
            seen.append((self.path, body))
            if body["signature_name"] == "embed_bytes":
                n = len(body["inputs"]["image_bytes"])
                out = {"outputs": [[1.0, 0.0]] * n}
                code = 200
            elif body["inputs"]["k"] > 3:
                out = {"error": "k: must be in [1, 3]"}
                code = 400
            else:
                k = body["inputs"]["k"]
                out = {"outputs": {"ids": [["a"] * k], "scores": [[0.5] * k]}}
                code = 200
            data = json.dumps(out).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        img = tmp_path / "q.png"
        img.write_bytes(b"\x89PNG\r\n\x1a\nfake")
        rest = _load("client_rest")
        url = f"http://127.0.0.1:{srv.server_port}"
        res = rest.main(["--url", url, "--model", "m", "--k", "2", str(img)])
        assert res == {"ids": [["a", "a"]], "scores": [[0.5, 0.5]]}
        path, body = seen[0]
        assert path == "/v1/models/m:predict"
        sent = body["inputs"]["image_bytes"][0]["b64"]
        assert base64.b64decode(sent) == img.read_bytes()
        assert seen[1][1]["inputs"] == {"embeddings": [[1.0, 0.0]], "k": 2}
        try:
            rest.search(url, "m", [[1.0, 0.0]], 9)
            raise AssertionError("expected an error")
        except RuntimeError as e:
            assert "400" in str(e) and "k: must be" in str(e)
    finally:
        srv.shutdown()


class _Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """``Predict`` as TF-Serving runs it on one loaded SavedModel."""

    def __init__(self, name, path):
        self.name = name
        self.model = tf.saved_model.load(path)
        self.calls = []

    def Predict(self, request, context):
        spec = request.model_spec
        if spec.name != self.name:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: Latest({spec.name})",
            )
        sig_name = spec.signature_name or "serving_default"
        if sig_name not in self.model.signatures:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f'Serving signature key "{sig_name}" not found.',
            )
        inputs = {
            k: tf.constant(tf.make_ndarray(v))
            for k, v in request.inputs.items()
        }
        self.calls.append((sig_name, inputs))
        try:
            out = self.model.signatures[sig_name](**inputs)
        except tf.errors.InvalidArgumentError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)
        except (TypeError, ValueError) as e:  # wrong dtype or input names
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        resp = predict_pb2.PredictResponse()
        resp.model_spec.CopyFrom(spec)
        for k, v in out.items():
            resp.outputs[k].CopyFrom(tf.make_tensor_proto(v.numpy()))
        return resp


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A brute-force export (export/export.py) behind an in-process server."""
    tmp = tmp_path_factory.mktemp("grpc")
    run = tiny_run_dir(tmp, H, W, C, D)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (N, H, W, C), dtype=np.uint8)
    ids = np.array([f"img-{i:03d}" for i in range(N)])
    np.savez(tmp / "gallery.npz", X=x, y=np.arange(N) % 3, ids=ids)
    written = _load("export", ("export",)).main(
        ["--run", str(run), "--out", str(tmp / "models")]
        + ["--gallery", str(tmp / "gallery.npz"), "--name", "dml"]
        + ["--index", "brute_force", "--k", str(K)]
    )
    servicer = _Servicer("dml", written["brute_force"])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        servicer, server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    server.start()
    # Query files: PNG of the model size, PNG of another size, JPEG.
    files = []
    for i, (shape, enc) in enumerate(
        [
            ((H, W, C), tf.io.encode_png),
            ((H + 5, W + 3, C), tf.io.encode_png),
            ((H, W, C), tf.io.encode_jpeg),
        ]
    ):
        a = rng.integers(0, 256, shape, dtype=np.uint8)
        path = tmp / f"q{i}.{'jpg' if enc is tf.io.encode_jpeg else 'png'}"
        path.write_bytes(enc(a).numpy())
        files.append(str(path))
    # A second, independent load gives the expected answers in process.
    direct = tf.saved_model.load(written["brute_force"])
    try:
        yield dict(
            target=f"127.0.0.1:{port}",
            servicer=servicer,
            direct=direct.signatures,
            files=files,
            ids=ids,
            tmp=tmp,
        )
    finally:
        server.stop(None).wait()


def _direct(sigs, files, k):
    byts = tf.constant([open(f, "rb").read() for f in files])
    emb = sigs["embed_bytes"](image_bytes=byts)["embeddings"]
    out = sigs["search"](embeddings=emb, k=tf.constant(k, tf.int32))
    return emb.numpy(), out["ids"].numpy().astype(str), out["scores"].numpy()


@pytest.mark.parametrize("k", [1, K, N])
def test_grpc_client_against_served_export(served, k, capsys):
    client = _load("client_grpc")
    del served["servicer"].calls[:]
    args = ["--target", served["target"], "--model", "dml", "--k", str(k)]
    res = client.main(args + served["files"])
    emb, ids, scores = _direct(served["direct"], served["files"], k)
    assert np.array(res["ids"]).shape == (len(served["files"]), k)
    np.testing.assert_array_equal(np.array(res["ids"]), ids)
    np.testing.assert_allclose(np.array(res["scores"]), scores, atol=1e-6)
    assert set(np.ravel(res["ids"])) <= set(served["ids"])
    assert all(np.all(np.diff(r) <= 1e-6) for r in res["scores"])
    # The server saw the requests the client is meant to send.
    (s1, in1), (s2, in2) = served["servicer"].calls
    assert (s1, sorted(in1)) == ("embed_bytes", ["image_bytes"])
    assert [b.numpy() for b in in1["image_bytes"]] == [
        open(f, "rb").read() for f in served["files"]
    ]
    assert (s2, sorted(in2)) == ("search", ["embeddings", "k"])
    assert in2["k"].dtype == tf.int32 and in2["k"].shape == ()
    np.testing.assert_array_equal(in2["embeddings"].numpy(), emb)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(served["files"])
    for line, path, row in zip(printed, served["files"], ids):
        assert line.startswith(f"{path}: {row[0]} (")
        assert line.count("(") == k


def _invalid(fn, words, code=grpc.StatusCode.INVALID_ARGUMENT):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    assert info.value.code() == code, info.value
    for word in words:
        assert word in info.value.details(), info.value.details()


def test_grpc_client_bad_inputs_invalid_argument(served):
    client = _load("client_grpc")
    base = ["--target", served["target"], "--model", "dml"]
    files = served["files"]
    for k in (N + 1, 0):
        _invalid(
            lambda: client.main(base + ["--k", str(k)] + files),
            [f"k: must be in [1, {N}]"],
        )
    bad = served["tmp"] / "bad.png"
    bad.write_bytes(b"not an image")
    _invalid(lambda: client.main(base + [files[0], str(bad)]), ["image_bytes"])
    with grpc.insecure_channel(served["target"]) as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        _invalid(
            lambda: client.search(stub, "dml", np.zeros((2, D + 1)), 2),
            [f"embeddings: expected shape [batch, {D}]"],
        )
        # A wrong dtype is refused by the signature.
        _invalid(
            lambda: client.predict(
                stub,
                "dml",
                "search",
                {"embeddings": np.zeros((1, D)), "k": np.int32(2)},
            ),
            ["float", "double"],
        )
        _invalid(
            lambda: client.search(stub, "other", np.zeros((1, D)), 2),
            ["other"],
            grpc.StatusCode.NOT_FOUND,
        )
        # The server still answers a good request afterwards.
        res = client.search(stub, "dml", np.eye(D, dtype="float32")[:1], N)
        assert sorted(res["ids"][0]) == sorted(served["ids"])
