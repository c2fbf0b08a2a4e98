"""A Hugging Face Hub on localhost, for pushing to offline: the few endpoints an upload uses (make a
repository, ask how each file is uploaded, commit), answered by ``http.server`` and kept in memory.
huggingface_hub talks to it over real HTTP, exactly as to the Hub; only the server is stand-in."""

from __future__ import annotations

import base64
import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self):
        self.files: dict[str, dict[str, bytes]] = {}  # repo -> path -> content
        self.requests: list[tuple[str, str]] = []
        self.url = ""


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def _json(self, obj, code=200):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            hub.requests.append(("POST", self.path))
            if self.path.startswith("/api/repos/create"):
                repo = json.loads(body)
                name = (
                    f"{repo.get('organization') or 'user'}/{repo['name']}" if "/" not in repo["name"] else repo["name"]
                )
                hub.files.setdefault(name, {})
                return self._json({"url": f"{hub.url}/{name}"})
            if self.path.startswith("/api/validate-yaml"):  # a model card's metadata: accepted
                return self._json({"errors": [], "warnings": []})
            if "/preupload/" in self.path:  # every file inline in the commit, none through LFS
                return self._json(
                    {
                        "files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                            for f in json.loads(body)["files"]
                        ]
                    }
                )
            if "/commit/" in self.path:
                repo = self.path.split("/api/models/")[1].split("/commit/")[0]
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item.get("key") == "file":
                        hub.files.setdefault(repo, {})[item["value"]["path"]] = base64.b64decode(
                            item["value"]["content"]
                        )
                return self._json({"commitUrl": f"{hub.url}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40})
            self._json({"error": "not here"}, 404)

        def do_GET(self):
            hub.requests.append(("GET", self.path))
            self._json({"error": "not here"}, 404)

        def log_message(self, *args):
            pass

    return Handler


@contextmanager
def fake_hub(monkeypatch):
    """Point huggingface_hub at a ``FakeHub`` (online, with a token) for the block."""
    from huggingface_hub import constants

    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    try:
        yield hub
    finally:
        server.shutdown()
