"""Query a tfdml model on TF-Serving's REST API (standard library only).

    python client_rest.py --url http://localhost:8501 --model tfdml \
        [--k 5] image.jpg [...]

Sends the encoded images as base64 (``{"b64": ...}``) to ``embed_bytes``,
then the embeddings to ``search`` and prints the top ids and scores.
"""

import argparse
import base64
import json
import sys
import urllib.request


def predict(url, model, signature, inputs, timeout=30):
    """POST /v1/models/<model>:predict with named (columnar) inputs."""
    body = json.dumps({"signature_name": signature, "inputs": inputs})
    req = urllib.request.Request(
        f"{url}/v1/models/{model}:predict",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())["outputs"]
    except urllib.error.HTTPError as e:  # INVALID_ARGUMENT names the input
        raise RuntimeError(f"{e.code}: {e.read().decode()}") from e


def embed_files(url, model, paths):
    images = []
    for p in paths:
        with open(p, "rb") as f:
            images.append({"b64": base64.b64encode(f.read()).decode()})
    out = predict(url, model, "embed_bytes", {"image_bytes": images})
    return out if isinstance(out, list) else out["embeddings"]


def search(url, model, embeddings, k):
    return predict(
        url, model, "search", {"embeddings": embeddings, "k": int(k)}
    )


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="http://localhost:8501")
    p.add_argument("--model", default="tfdml")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("images", nargs="+")
    a = p.parse_args(argv)
    emb = embed_files(a.url, a.model, a.images)
    res = search(a.url, a.model, emb, a.k)
    for path, ids, scores in zip(a.images, res["ids"], res["scores"]):
        hits = ", ".join(f"{i} ({s:.3f})" for i, s in zip(ids, scores))
        print(f"{path}: {hits}")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
