"""Query a tfdml model on TF-Serving's gRPC API (a PredictRequest).

    pip install grpcio
    pip install --no-deps tensorflow-serving-api==2.20.0
    python client_grpc.py --target localhost:8500 --model tfdml \
        [--k 5] image.jpg [...]

``tensorflow-serving-api`` declares a dependency on ``tensorflow``; install it
with ``--no-deps`` next to ``tensorflow-cpu`` (see requirements-serving.txt).

Calls ``embed_bytes`` with the encoded images, then ``search``. ``main``
returns ``{"ids": [[str]], "scores": [[float]]}``, one row per image. A bad
request raises ``grpc.RpcError`` (``INVALID_ARGUMENT``, the message names the
input).
"""

import argparse
import sys


def make_request(model, signature, inputs):
    """A ``PredictRequest`` with ``inputs`` {name: array-like}."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    req = predict_pb2.PredictRequest()
    req.model_spec.name = model
    req.model_spec.signature_name = signature
    for name, value in inputs.items():
        req.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return req


def predict(stub, model, signature, inputs, timeout=30.0):
    """{output name: NumPy array} of one ``Predict`` call."""
    import tensorflow as tf

    resp = stub.Predict(make_request(model, signature, inputs), timeout=timeout)
    return {k: tf.make_ndarray(v) for k, v in resp.outputs.items()}


def embed_files(stub, model, paths, timeout=30.0):
    """[B, d] embeddings of the encoded image files (``embed_bytes``)."""
    import numpy as np

    data = []
    for path in paths:
        with open(path, "rb") as f:
            data.append(f.read())
    out = predict(
        stub,
        model,
        "embed_bytes",
        {"image_bytes": np.array(data, dtype=object)},
        timeout,
    )
    return out["embeddings"]


def search(stub, model, embeddings, k, timeout=30.0):
    """{"ids": [[str]], "scores": [[float]]}: the top ``k`` per row."""
    import numpy as np

    res = predict(
        stub,
        model,
        "search",
        {
            "embeddings": np.asarray(embeddings, np.float32),
            "k": np.int32(k),
        },
        timeout,
    )
    return {
        "ids": [[i.decode() for i in row] for row in res["ids"]],
        "scores": res["scores"].tolist(),
    }


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--target", default="localhost:8500")
    p.add_argument("--model", default="tfdml")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("images", nargs="+")
    a = p.parse_args(argv)
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(a.target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        emb = embed_files(stub, a.model, a.images, a.timeout)
        res = search(stub, a.model, emb, a.k, a.timeout)
    for path, ids, scores in zip(a.images, res["ids"], res["scores"]):
        hits = ", ".join(f"{i} ({s:.3f})" for i, s in zip(ids, scores))
        print(f"{path}: {hits}")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
