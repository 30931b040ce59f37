"""The serving clients build the requests TF-Serving expects (stub server)."""

import base64
import importlib.util
import json
import os
import threading
from http.server import BaseHTTPRequestHandler
from http.server import HTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "export", "serving", f"{name}.py")
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


def test_grpc_client_module_imports():
    # tensorflow-serving-api is not a project dependency: only the module
    # (with its lazy imports) is checked here.
    grpc_client = _load("client_grpc")
    assert callable(grpc_client.make_request)
    assert callable(grpc_client.predict)
