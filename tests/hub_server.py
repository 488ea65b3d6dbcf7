"""A small Hub-protocol server on 127.0.0.1 for push/pull round trips in tests (test scaffolding, not shipped).

It speaks the endpoints that huggingface_hub's upload and download paths use (GUIDE section 5): repo creation,
preupload, NDJSON commits with base64 ("regular") files, the LFS batch API with PUT uploads, repo info, tree
listing and resolve. Files live in memory; every commit gets a fresh sha. Xet uploads need a token service that no
local server can provide, so they cannot be exercised offline: tests run with uploadMode "regular", or "lfs" with
HF_HUB_DISABLE_XET=1.

Run standalone: python tests/hub_server.py [--lfs] [--port N]
"""

import base64
import hashlib
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class HubState:
    def __init__(self, upload_mode: str):
        self.upload_mode = upload_mode  # "regular" or "lfs"
        self.repos: dict[str, dict] = {}  # repo_id -> {"sha": str, "files": {path: bytes}, "private": bool}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content
        self.lock = threading.Lock()
        self.commits: list[dict] = []  # what each commit carried, for assertions


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState  # set by `serve`

    def log_message(self, format, *args):  # keep test output quiet
        pass

    # -- plumbing ---------------------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        # Always drain the body, even on unknown routes, or the keep-alive connection desyncs.
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None,
              head_only: bool = False):
        body = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else b"")
        self.send_response(status)
        if raw is None:
            self.send_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def _base_url(self) -> str:
        return f"http://{self.headers.get('Host')}"

    # -- routes -----------------------------------------------------------------------------------------------------

    def do_POST(self):
        body = self._body()
        path = urlparse(self.path).path
        if path == "/api/repos/create":
            return self._create_repo(json.loads(body or b"{}"))
        if path == "/api/validate-yaml":
            return self._send(200, {})
        match = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+)/([^/]+)/preupload/(.+)", path)
        if match:
            files = json.loads(body)["files"]
            mode = self.state.upload_mode
            return self._send(200, {"files": [{"path": f["path"], "uploadMode": mode, "shouldIgnore": False}
                                              for f in files], "commitOid": self._repo(match)["sha"]})
        match = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+)/([^/]+)/commit/(.+)", path)
        if match:
            return self._commit(match, body)
        match = re.fullmatch(r"/(?:datasets/|spaces/)?([^/]+)/([^/]+?)(?:\.git)?/info/lfs/objects/batch", path)
        if match:
            return self._lfs_batch(json.loads(body))
        return self._send(404, {"error": f"unknown route POST {path}"})

    def do_PUT(self):
        body = self._body()
        match = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", urlparse(self.path).path)
        if not match:
            return self._send(404, {"error": "unknown route"})
        oid = match.group(1)
        if hashlib.sha256(body).hexdigest() != oid:
            return self._send(400, {"error": "sha256 mismatch"})
        with self.state.lock:
            self.state.lfs_objects[oid] = body
        return self._send(200, {})

    def do_GET(self):
        self._body()
        self._get(head_only=False)

    def do_HEAD(self):
        self._body()
        self._get(head_only=True)

    def _get(self, head_only: bool):
        parsed = urlparse(self.path)
        path = unquote(parsed.path)
        if path == "/api/whoami-v2":
            return self._send(200, {"type": "user", "name": "tester", "fullname": "Tester", "orgs": [],
                                    "auth": {"accessToken": {"role": "write", "displayName": "test"}}})
        match = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+)/([^/]+)(?:/revision/([^/]+))?", path)
        if match:
            repo = self._repo(match, required=False)
            if repo is None:
                return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            repo_id = f"{match.group(2)}/{match.group(3)}"
            return self._send(200, {"id": repo_id, "modelId": repo_id, "sha": repo["sha"],
                                    "private": repo["private"], "siblings": [{"rfilename": p} for p in repo["files"]]})
        match = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+)/([^/]+)/tree/([^/]+)(?:/(.*))?", path)
        if match:
            repo = self._repo(match, required=False)
            if repo is None:
                return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            prefix = (match.group(5) or "").strip("/")
            entries = [{"type": "file", "oid": hashlib.sha1(content).hexdigest(), "size": len(content), "path": p}
                       for p, content in sorted(repo["files"].items()) if not prefix or p.startswith(prefix + "/")]
            return self._send(200, entries)
        match = re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)", path)
        if match:
            repo = self.state.repos.get(f"{match.group(2)}/{match.group(3)}")
            if repo is None:
                return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"},
                                  head_only=head_only)
            content = repo["files"].get(match.group(5))
            headers = {"X-Repo-Commit": repo["sha"]}
            if content is None:
                return self._send(404, {"error": "Entry not found"}, {**headers, "X-Error-Code": "EntryNotFound"},
                                  head_only=head_only)
            etag = f'"{hashlib.sha256(content).hexdigest()}"'
            return self._send(200, headers={**headers, "ETag": etag, "Content-Type": "application/octet-stream"},
                              raw=content, head_only=head_only)
        return self._send(404, {"error": f"unknown route GET {path}"}, head_only=head_only)

    # -- handlers ---------------------------------------------------------------------------------------------------

    def _repo(self, match, required: bool = True):
        repo_id = f"{match.group(2)}/{match.group(3)}"
        repo = self.state.repos.get(repo_id)
        if repo is None and required:
            raise KeyError(repo_id)
        return repo

    def _create_repo(self, request: dict):
        namespace = request.get("organization") or "tester"
        repo_id = f"{namespace}/{request['name']}"
        url = f"{self._base_url()}/{repo_id}"
        with self.state.lock:
            if repo_id in self.state.repos:
                return self._send(409, {"error": "You already created this model repo", "url": url})
            self.state.repos[repo_id] = {"sha": uuid.uuid4().hex + "00000000", "files": {},
                                         # huggingface_hub 2.x sends `visibility`; older clients `private`
                                         "private": request.get("visibility") == "private"
                                         or bool(request.get("private"))}
        return self._send(200, {"url": url, "name": repo_id})

    def _commit(self, match, body: bytes):
        repo = self._repo(match, required=False)
        if repo is None:
            return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        changes, header = {}, {}
        deleted: list[str] = []
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                changes[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                content = self.state.lfs_objects.get(value["oid"])
                if content is None:
                    return self._send(422, {"error": f"LFS object {value['oid']} was never uploaded"})
                changes[value["path"]] = content
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
        with self.state.lock:
            for path in deleted:
                for existing in list(repo["files"]):
                    if existing == path or existing.startswith(path.rstrip("/") + "/"):
                        del repo["files"][existing]
            repo["files"].update(changes)
            repo["sha"] = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
            self.state.commits.append({"summary": header.get("summary"), "paths": sorted(changes)})
        repo_id = f"{match.group(2)}/{match.group(3)}"
        return self._send(200, {"commitOid": repo["sha"], "commitUrl": f"{self._base_url()}/{repo_id}/commit/"
                                f"{repo['sha']}", "pullRequestUrl": None})

    def _lfs_batch(self, request: dict):
        objects = []
        for obj in request.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self._base_url()}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        return self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                          {"Content-Type": "application/vnd.git-lfs+json"})


def serve(upload_mode: str = "regular", port: int = 0) -> tuple[ThreadingHTTPServer, HubState]:
    """Start the server in a daemon thread on 127.0.0.1; returns (server, state). Stop with server.shutdown()."""
    state = HubState(upload_mode)
    handler = type("BoundHubHandler", (HubHandler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state


if __name__ == "__main__":
    import argparse
    import time

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lfs", action="store_true", help="answer preupload with uploadMode 'lfs'")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=600, help="stop after this long")
    args = parser.parse_args()
    server, _ = serve("lfs" if args.lfs else "regular", args.port)
    print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
    time.sleep(args.seconds)
    server.shutdown()
