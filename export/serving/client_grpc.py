"""Query a tfdml model on TF-Serving's gRPC API (a PredictRequest).

    pip install tensorflow-serving-api grpcio
    python client_grpc.py --target localhost:8500 --model tfdml \
        [--k 5] image.jpg [...]

Calls ``embed_bytes`` with the encoded images, then ``search``.
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
    import tensorflow as tf

    resp = stub.Predict(make_request(model, signature, inputs), timeout)
    return {k: tf.make_ndarray(v) for k, v in resp.outputs.items()}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--target", default="localhost:8500")
    p.add_argument("--model", default="tfdml")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("images", nargs="+")
    a = p.parse_args(argv)
    import grpc
    import numpy as np
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    stub = prediction_service_pb2_grpc.PredictionServiceStub(
        grpc.insecure_channel(a.target)
    )
    data = [open(path, "rb").read() for path in a.images]
    emb = predict(
        stub, a.model, "embed_bytes", {"image_bytes": np.array(data, object)}
    )["embeddings"]
    res = predict(
        stub, a.model, "search", {"embeddings": emb, "k": np.int32(a.k)}
    )
    for path, ids, scores in zip(a.images, res["ids"], res["scores"]):
        hits = ", ".join(f"{i.decode()} ({s:.3f})" for i, s in zip(ids, scores))
        print(f"{path}: {hits}")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
