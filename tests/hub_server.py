"""A small stand-in for the Hugging Face Hub's HTTP API, for tests (no network beyond 127.0.0.1).

It implements what huggingface_hub 1.x / 2.x send for ``create_repo``, ``create_branch``,
``repo_info`` / ``repo_exists``, ``create_commit`` (validate-yaml, preupload, the LFS batch API with
basic single-part upload + verify, the NDJSON commit), ``list_repo_tree``, ``get_paths_info`` and
``hf_hub_download`` / ``snapshot_download`` (HEAD / GET on ``resolve`` with ``X-Repo-Commit`` and
``ETag``, byte ranges). Errors carry the Hub's ``X-Error-Code`` / ``X-Error-Message`` headers.

Files are stored by sha256 in a temporary directory. Write calls need ``Authorization: Bearer T``
with ``T`` in ``tokens`` (401 otherwise), repos belong to the token's user (403 elsewhere), a second
create of a repo is a 409. Bounded: bodies up to ``max_body`` bytes (413 above), and the server
stops by itself ``lifetime`` seconds after it starts. It does not speak Xet: clients must upload
large files through LFS (``HF_HUB_DISABLE_XET``). Use it as a context manager::

    with HubServer(tokens={"hf_secret": "alice"}) as hub:
        HfApi(endpoint=hub.url, token="hf_secret").create_repo("alice/x")
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".npz")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


class HubHTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass(frozen=True)
class Blob:
    sha256: str
    size: int
    git_oid: str
    lfs: bool

    def entry(self, path: str) -> dict:
        e = {"type": "file", "oid": self.git_oid, "size": self.size, "path": path}
        if self.lfs:
            e["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": 134}
        return e


@dataclass
class Repo:
    owner: str
    private: bool
    created: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class HubServer:
    """The Hub's state and a threaded HTTP server on ``127.0.0.1:<random port>``."""

    def __init__(self, tokens: dict[str, str], lfs_threshold: int = 10 * 2**20, lifetime: float = 300.0,
                 max_body: int = 512 * 2**20):
        self.tokens, self.lfs_threshold, self.lifetime, self.max_body = dict(tokens), lfs_threshold, lifetime, max_body
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path with query), in arrival order
        self.auth_headers: list[str] = []
        self._upload_grants: dict[str, str] = {}  # grant -> sha256 it may upload
        self._lock = threading.RLock()
        self._tmp: Path | None = None
        self._httpd: ThreadingHTTPServer | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> HubServer:
        self._tmp = Path(tempfile.mkdtemp(prefix="hub-server-"))
        (self._tmp / "blobs").mkdir()
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._timer = threading.Timer(self.lifetime, self._httpd.shutdown)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        self._httpd.shutdown()
        self._httpd.server_close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # -- storage ---------------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return self._tmp / "blobs" / sha256

    def store(self, data: bytes, lfs: bool) -> Blob:
        sha = hashlib.sha256(data).hexdigest()
        git_oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        self.blob_path(sha).write_bytes(data)
        return Blob(sha, len(data), git_oid, lfs)

    def lfs_blob(self, sha256: str, size: int) -> Blob:
        path = self.blob_path(sha256)
        if not path.is_file() or path.stat().st_size != size:
            raise HubHTTPError(422, f"LFS object {sha256} of {size} bytes was not uploaded")
        data = path.read_bytes()
        return Blob(sha256, size, hashlib.sha1(b"blob %d\0" % size + data).hexdigest(), True)

    def file_bytes(self, repo_id: str, revision: str, path: str) -> bytes:
        """What a file holds at a revision (for tests)."""
        return self.blob_path(self._head(self.repos[repo_id], revision)[1][path].sha256).read_bytes()

    # -- repos -----------------------------------------------------------------------------------
    def user(self, auth: str | None, required: bool) -> str | None:
        if not auth:
            if required:
                raise HubHTTPError(401, "You must be authenticated to access this endpoint")
            return None
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        if token not in self.tokens:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def repo(self, repo_id: str, user: str | None, write: bool = False) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            raise HubHTTPError(404, "Repository not found", "RepoNotFound")
        if write and user != repo.owner:
            raise HubHTTPError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def tree(self, repo_id: str, revision: str, user: str | None) -> tuple[str, dict[str, Blob]]:
        """``(commit sha, files)`` of a branch or commit, as ``user`` may see it."""
        return self._head(self.repo(repo_id, user), revision)

    @staticmethod
    def _head(repo: Repo, revision: str) -> tuple[str, dict[str, Blob]]:
        sha = repo.branches.get(revision, revision if revision in repo.commits else None)
        if sha is None:
            raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha, repo.commits[sha]

    def create_repo(self, user: str, body: dict) -> dict:
        namespace = body.get("organization") or user
        if namespace != user:
            raise HubHTTPError(403, f"You don't have the rights to create a model under the namespace {namespace}")
        repo_id = f"{namespace}/{body['name']}"
        with self._lock:
            if repo_id in self.repos:
                raise HubHTTPError(409, "You already created this model repo")
            private = body.get("private") or body.get("visibility") == "private"
            repo = self.repos[repo_id] = Repo(user, bool(private), _now())
            self._commit(repo, "main", {".gitattributes": self.store(GITATTRIBUTES, False)}, "initial commit")
        return {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    def _commit(self, repo: Repo, branch: str, files: dict[str, Blob], message: str) -> str:
        parent = repo.branches.get(branch, "")
        listing = json.dumps({p: b.git_oid for p, b in sorted(files.items())})
        sha = hashlib.sha1(f"{parent}\n{listing}\n{message}\n{secrets.token_hex(4)}".encode()).hexdigest()
        repo.commits[sha], repo.branches[branch] = files, sha
        return sha

    def commit(self, repo_id: str, branch: str, user: str, body: bytes) -> dict:
        repo = self.repo(repo_id, user, write=True)
        if branch not in repo.branches:
            raise HubHTTPError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubHTTPError(400, "the first NDJSON line must be the commit header")
        with self._lock:
            files = dict(repo.commits[repo.branches[branch]])
            for item in lines[1:]:
                self._apply(files, item["key"], item["value"])
            sha = self._commit(repo, branch, files, lines[0]["value"].get("summary", ""))
        return {"success": True, "commitOid": sha, "commitUrl": f"{self.url}/{repo_id}/commit/{sha}",
                "hookOutput": "", "pullRequestUrl": None}

    def _apply(self, files: dict[str, Blob], key: str, value: dict) -> None:
        path = value["path"]
        if key == "file":
            data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else value["content"].encode()
            if len(data) > self.lfs_threshold:
                raise HubHTTPError(400, f"{path} is larger than {self.lfs_threshold} bytes; upload it with LFS")
            files[path] = self.store(data, False)
        elif key == "lfsFile":
            files[path] = self.lfs_blob(value["oid"], int(value.get("size", -1)))
        elif key in ("deletedFile", "deletedFolder"):
            for p in [p for p in files if p == path or p.startswith(path.rstrip("/") + "/")]:
                del files[p]
        else:
            raise HubHTTPError(400, f"unknown commit operation {key!r}")

    def upload_mode(self, path: str, size: int) -> str:
        return "lfs" if size > 0 and (size > self.lfs_threshold or path.endswith(LFS_SUFFIXES)) else "regular"

    def lfs_batch(self, body: dict) -> dict:
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry = {"oid": oid, "size": size, "authenticated": True}
            if not self.blob_path(oid).is_file():
                grant = secrets.token_hex(8)
                self._upload_grants[grant] = oid
                entry["actions"] = {"upload": {"href": f"{self.url}/lfs-store/{grant}", "header": {}},
                                    "verify": {"href": f"{self.url}/lfs-verify", "header": {}}}
            objects.append(entry)
        return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def lfs_put(self, grant: str, data: bytes) -> None:
        oid = self._upload_grants.pop(grant, None)
        if oid is None:
            raise HubHTTPError(403, "unknown or used upload URL")
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubHTTPError(400, "uploaded content does not match its sha256")
        self.blob_path(oid).write_bytes(data)

    def info(self, repo_id: str, revision: str, user: str | None, blobs: bool) -> dict:
        repo = self.repo(repo_id, user)
        sha, files = self.tree(repo_id, revision, user)
        siblings = [{"rfilename": p, **({"size": b.size, "blobId": b.git_oid} if blobs else {})}
                    for p, b in sorted(files.items())]
        return {"id": repo_id, "modelId": repo_id, "author": repo.owner, "sha": sha, "private": repo.private,
                "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
                "createdAt": repo.created, "lastModified": _now(), "siblings": siblings}


_API = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/([a-z-]+)(?:/(.*))?)?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_LFS_BATCH = re.compile(r"^/([^/]+/[^/]+)\.git/info/lfs/objects/batch$")


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # -- plumbing --------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._chunked()
        n = int(self.headers.get("Content-Length") or 0)
        if n > self.hub.max_body:
            raise HubHTTPError(413, f"body of {n} bytes exceeds {self.hub.max_body}")
        return self.rfile.read(n)

    def _chunked(self) -> bytes:
        out = bytearray()
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline().strip():
                    pass
                return bytes(out)
            if len(out) + size > self.hub.max_body:
                raise HubHTTPError(413, f"body exceeds {self.hub.max_body} bytes")
            out += self.rfile.read(size)
            self.rfile.readline()

    def _send(self, status: int, payload=None, headers: dict | None = None, body: bytes | None = None) -> None:
        data = body if body is not None else (b"" if payload is None else json.dumps(payload).encode())
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if body is None else "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _handle(self) -> None:
        url = urlsplit(self.path)
        with self.hub._lock:
            self.hub.requests.append((self.command, self.path))
            self.hub.auth_headers.append(self.headers.get("Authorization") or "")
        try:
            self._route(url.path, parse_qs(url.query))
        except HubHTTPError as e:
            headers = {"X-Error-Message": e.message, **({"X-Error-Code": e.code} if e.code else {})}
            self._send(e.status, {"error": e.message}, headers)
            self.close_connection = e.status == 413
        except (KeyError, ValueError, TypeError) as e:
            self._send(400, {"error": f"bad request: {type(e).__name__}: {e}"})

    do_GET = do_HEAD = do_POST = do_PUT = _handle

    # -- routes ----------------------------------------------------------------------------------
    def _route(self, path: str, query: dict) -> None:
        hub, auth = self.hub, self.headers.get("Authorization")
        if m := _RESOLVE.match(path):
            return self._resolve(unquote(m[1]), unquote(m[2]), unquote(m[3]), hub.user(auth, False))
        if self.command == "PUT" and path.startswith("/lfs-store/"):
            hub.lfs_put(path.rsplit("/", 1)[1], self._body())
            return self._send(200, {})
        body = self._body() if self.command in ("POST", "PUT") else b""
        if path == "/api/repos/create" and self.command == "POST":
            return self._send(200, hub.create_repo(hub.user(auth, True), json.loads(body)))
        if path == "/api/validate-yaml" and self.command == "POST":
            return self._send(200, {"errors": [], "warnings": []})
        if path == "/api/whoami-v2":
            return self._send(200, {"type": "user", "name": hub.user(auth, True)})
        if path == "/lfs-verify" and self.command == "POST":
            v = json.loads(body)
            hub.lfs_blob(v["oid"], int(v["size"]))
            return self._send(200, {})
        if m := _LFS_BATCH.match(path):
            hub.repo(unquote(m[1]), hub.user(auth, True), write=True)
            return self._send(200, hub.lfs_batch(json.loads(body)))
        if m := _API.match(path):
            return self._api(unquote(m[1]), m[2], m[3], query, body, hub.user(auth, self.command == "POST"))
        raise HubHTTPError(404, f"no route for {self.command} {path}")

    def _api(self, repo_id: str, action: str | None, rest: str | None, query: dict, body: bytes, user) -> None:
        hub = self.hub
        rev, _, sub = (rest or "").partition("/")
        rev = unquote(rev) or "main"
        if action is None and self.command == "GET":
            return self._send(200, hub.info(repo_id, "main", user, "blobs" in query))
        if action == "revision" and self.command == "GET":
            return self._send(200, hub.info(repo_id, rev, user, "blobs" in query))
        if action == "tree" and self.command == "GET":
            return self._send(200, self._tree(repo_id, rev, unquote(sub), query, user))
        if action == "paths-info" and self.command == "POST":
            wanted = parse_qs(body.decode()).get("paths", [])
            files = hub.tree(repo_id, rev, user)[1]
            return self._send(200, [files[p].entry(p) for p in wanted if p in files])
        if action == "preupload" and self.command == "POST":
            files = hub.tree(repo_id, rev, user)[1] if rev in hub.repo(repo_id, user, True).branches else {}
            out = [{"path": f["path"], "uploadMode": hub.upload_mode(f["path"], int(f["size"])),
                    "shouldIgnore": False, "oid": files[f["path"]].git_oid if f["path"] in files else None}
                   for f in json.loads(body)["files"]]
            return self._send(200, {"files": out, "commitOid": hub.repos[repo_id].branches.get(rev)})
        if action == "commit" and self.command == "POST":
            return self._send(200, hub.commit(repo_id, rev, user, body))
        if action == "branch" and self.command == "POST":
            return self._send(200, self._branch(repo_id, rev, json.loads(body or b"{}"), user))
        raise HubHTTPError(404, f"no route for {self.command} /api/models/{repo_id}/{action}")

    def _tree(self, repo_id: str, rev: str, sub: str, query: dict, user) -> list[dict]:
        files = self.hub.tree(repo_id, rev, user)[1]
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        inside = {p: b for p, b in files.items() if p.startswith(prefix)}
        if prefix and not inside:
            raise HubHTTPError(404, f"{sub} does not exist", "EntryNotFound")
        out, folders = [], set()
        for p, b in sorted(inside.items()):
            rel = p[len(prefix):]
            if recursive or "/" not in rel:
                out.append(b.entry(p))
            if "/" in rel:
                parts = rel.split("/")[:-1]
                folders.update(prefix + "/".join(parts[:i + 1]) for i in range(len(parts) if recursive else 1))
        return out + [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "path": f}
                      for f in sorted(folders)]

    def _branch(self, repo_id: str, branch: str, body: dict, user) -> dict:
        hub = self.hub
        repo = hub.repo(repo_id, user, write=True)
        with hub._lock:
            if branch in repo.branches:
                raise HubHTTPError(409, f"Branch {branch} already exists")
            repo.branches[branch] = hub.tree(repo_id, body.get("startingPoint") or "main", user)[0]
        return {}

    def _resolve(self, repo_id: str, rev: str, path: str, user) -> None:
        if self.command not in ("GET", "HEAD"):
            raise HubHTTPError(405, "resolve is read-only")
        sha, files = self.hub.tree(repo_id, rev, user)
        blob = files.get(path)
        if blob is None:
            raise HubHTTPError(404, f"Entry not found: {path}", "EntryNotFound")
        data = self.hub.blob_path(blob.sha256).read_bytes()
        headers = {"X-Repo-Commit": sha, "ETag": f'"{blob.sha256 if blob.lfs else blob.git_oid}"',
                   "Accept-Ranges": "bytes"}
        status, start, end = self._range(len(data))
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        self._send(status, headers=headers, body=data[start:end])

    def _range(self, size: int) -> tuple[int, int, int]:
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "").strip())
        if not m:
            return 200, 0, size
        start, end = int(m[1]), (int(m[2]) + 1 if m[2] else size)
        if start >= size:
            raise HubHTTPError(416, f"range start {start} is past the end ({size})")
        return 206, start, min(end, size)
