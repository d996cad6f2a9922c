"""A small local look-alike of the Hugging Face Hub HTTP API, for tests.

It speaks enough of the protocol for the real `huggingface_hub` client (2.4.0): whoami, create_repo,
repo info, tree listing, list_models(search=...), downloads (`/resolve`, with HEAD and Range), gated repos
(`grant`), the classic upload path (preupload -> LFS batch + PUT -> NDJSON commit) and Jobs, whose commands
run as local subprocesses (`hub.jobs`, see `tests/hub_jobs.py`).

Xet is NOT implemented: with `hf_xet` installed the client uploads through Xet unless
`huggingface_hub.constants.HF_HUB_DISABLE_XET` is True (see `tests/hub_fixtures.py`).

State lives in memory; file contents are stored by sha256 under a per-server folder.
Only the standard library is used.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from tests.hub_jobs import JobsBackend, JobsError

# What a client process needs, besides HF_ENDPOINT and HF_HOME, to talk to this server and nothing else.
CLIENT_ENV = {
    # hf_xet is installed, so uploads would go through Xet (unknown to the test hub) and upload_folder
    # would split into several commits; this flag restores the classic LFS path. Downloads only use
    # Xet when the server sends X-Xet-Hash headers, which the test hub never does.
    "HF_HUB_DISABLE_XET": "1",
    # Also stops the client from fetching /api/agent-harnesses to build its User-Agent.
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_ETAG_TIMEOUT": "5",
    "HF_HUB_DOWNLOAD_TIMEOUT": "10",
    "HF_HUB_OFFLINE": "0",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}

# Files the Hub stores through LFS: big ones, binary ones, or ones matching its default .gitattributes.
LFS_THRESHOLD = 10 * 1024 * 1024
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack",
                ".npy", ".npz", ".pkl", ".model", ".zip", ".tar", ".gz", ".zst")
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
TYPE_PLURALS = {"model": "models", "dataset": "datasets", "space": "spaces"}
TYPE_FROM_PLURAL = {v: k for k, v in TYPE_PLURALS.items()}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
REPO_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")

API_RE = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(.*))?$")
RESOLVE_RE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
LFS_BATCH_RE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch$")
LFS_PUT_RE = re.compile(r"^/_lfs/([0-9a-f]{32})$")
RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(512)


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk


def wants_lfs(path: str, size: int, sample: bytes) -> bool:
    """Upload mode the fake Hub answers in preupload (and uses when seeding files)."""
    return size > 0 and (size >= LFS_THRESHOLD or path.lower().endswith(LFS_SUFFIXES) or b"\0" in sample)


class HubError(Exception):
    """An HTTP error answered to the client; `code` goes to `X-Error-Code`, which the client maps to errors."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = headers or {}, extra or {}  # extra: more fields of the JSON error body


@dataclass(frozen=True)
class Blob:
    sha256: str
    size: int
    lfs: bool
    blob_id: str  # git oid: of the content for regular files, of the pointer file for LFS files

    @property
    def oid(self) -> str:
        """The oid preupload reports for an existing file (what the client compares to skip unchanged files)."""
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class Commit:
    sha: str
    parent: str | None
    title: str
    description: str
    author: str
    date: str
    tree: dict[str, Blob]
    changed: list[str]
    deleted: list[str]


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    gated: bool
    created_at: str = field(default_factory=_now)
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)  # insertion order is chronological
    lfs_oids: set[str] = field(default_factory=set)  # LFS objects uploaded to this repo
    granted: set[str] = field(default_factory=set)  # users given access to a gated repo's files (see grant)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]


@dataclass(frozen=True)
class User:
    name: str
    orgs: tuple[str, ...]
    jobs: bool = True  # whether the user's token may start Jobs (job.write)

    def can_write(self, namespace: str) -> bool:
        return namespace == self.name or namespace in self.orgs


class HubServer:
    """A Hub-compatible HTTP server on 127.0.0.1 (free port), run in a background thread.

    Seeding helpers (`create_repo`, `put_file`, `upload_folder`) bypass auth. Methods taking a
    `repo_id` also accept `repo_type=` ("model" by default). Every repo starts with an initial
    commit holding `.gitattributes`, like on the real Hub.
    """

    def __init__(self, root: Path | None = None):
        self._owns_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="hubserver-"))
        self._objects = self.root / "objects"
        self._objects.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._users: dict[str, User] = {}  # token -> user
        self._repos: dict[tuple[str, str], Repo] = {}  # (repo_type, repo_id) -> repo
        self._uploads: dict[str, tuple[tuple[str, str], str, int]] = {}  # ticket -> (repo key, oid, size)
        # (method, path) of every request in arrival order; the path is as sent (URL-quoted), without query.
        self.requests_log: list[tuple[str, str]] = []
        self._faults = FaultPlan()  # fault injection (see the section at the end of this file)
        self.jobs = JobsBackend(self)  # /api/jobs: Jobs run as local subprocesses
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> HubServer:
        self._httpd = _HTTPServer(self)
        host, port = self._httpd.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hubserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.jobs.stop()  # kills the Jobs' processes and ends their log streams
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.close_connections()  # idle keep-alive connections would otherwise linger
            self._httpd.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._httpd = self._thread = None
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def inject(self, path_regex: str, faults: Sequence[Fault], method: str | None = None,
               whole_files: bool = False) -> None:
        """Answer the next requests whose path matches with these faults, one each (see `Fault`); with
        `whole_files`, only requests for a whole file (not a Range read such as a safetensors header)."""
        self._faults.add(path_regex, faults, method, whole_files)

    @property
    def faults_log(self) -> list[tuple[str, str, str]]:
        """(method, path, fault) of every fault served, in order."""
        return self._faults.log

    def reset(self) -> None:
        """Forget repos, pending uploads and the request log (users are kept)."""
        with self._lock:
            self._repos.clear()
            self._uploads.clear()
            self.requests_log.clear()

    # -- seeding and assertions (no auth) -------------------------------------------------------------------

    def add_user(self, name: str, token: str, orgs: list[str] | tuple[str, ...] = (), jobs: bool = True) -> None:
        """`jobs=False`: a fine-grained token without the permission to start Jobs."""
        with self._lock:
            self._users[token] = User(name, tuple(orgs), jobs)

    def create_repo(self, repo_id: str, *, private: bool = False, gated: bool = False,
                    repo_type: str = "model") -> None:
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise ValueError(f"{repo_type} repo {repo_id} already exists")
            self._new_repo(repo_id, repo_type, private, gated, author="hub-seed")

    def put_file(self, repo_id: str, path: str, data: bytes, *, revision: str = "main",
                 repo_type: str = "model") -> str:
        """Commit one file (creating branch `revision` from main if needed); returns the commit sha."""
        return self._seed_commit(repo_type, repo_id, revision, f"Upload {path}", {path: data})

    def upload_folder(self, repo_id: str, folder: Path, *, revision: str = "main", repo_type: str = "model") -> str:
        """Commit all files under `folder` in one commit; returns the commit sha."""
        folder = Path(folder)
        files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
        return self._seed_commit(repo_type, repo_id, revision, "Upload folder", files)

    def files(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> dict[str, bytes]:
        with self._lock:
            commit = self._commit_at(self._repo(repo_type, repo_id), revision)
        return {path: self._read_sha(blob.sha256) for path, blob in sorted(commit.tree.items())}

    def commits(self, repo_id: str, *, repo_type: str = "model") -> list[dict]:
        """History of all branches, oldest first: sha, parent, title, description, author,
        files (all paths in the tree), changed (added or updated paths), deleted."""
        with self._lock:
            return [{"sha": c.sha, "parent": c.parent, "title": c.title, "description": c.description,
                     "author": c.author, "files": sorted(c.tree), "changed": list(c.changed),
                     "deleted": list(c.deleted)} for c in self._repo(repo_type, repo_id).commits.values()]

    def repo_info(self, repo_id: str, *, repo_type: str = "model") -> dict:
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            return {"id": repo.repo_id, "type": repo.repo_type, "private": repo.private, "gated": repo.gated,
                    "sha": repo.branches["main"], "branches": dict(repo.branches)}

    # -- gated repos -------------------------------------------------------------------------------------------
    # Like the Hub: a gated repo's metadata (repo info, file list) is public; its files (`/resolve`, which also
    # serves the safetensors headers the client reads by range) go only to its owners and to users granted
    # access. Others get GatedRepo (the client raises GatedRepoError): 401 anonymous, 403 signed in.

    def grant(self, repo_id: str, user: str, *, repo_type: str = "model") -> None:
        """Give user `user` (a name) access to a gated repo's files, as when the Hub accepts their request."""
        with self._lock:
            self._repo(repo_type, repo_id).granted.add(user)

    def _check_gate(self, user: User | None, repo: Repo) -> None:
        if not repo.gated or (user and (user.can_write(repo.namespace) or user.name in repo.granted)):
            return
        what = f"{repo.repo_type} {repo.repo_id}"
        if user is None:
            raise HubError(401, f"Access to {what} is restricted. You must have access to it and be authenticated"
                                " to access it. Please log in.", "GatedRepo")
        raise HubError(403, f"Access to {what} is restricted and you are not in the authorized list. "
                            f"Visit {self.url}/{URL_PREFIX[repo.repo_type]}{repo.repo_id} to ask for access.",
                       "GatedRepo")

    # -- internals: methods reading or changing `_repos` run with `_lock` held ----------------------------------

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id}")
        return repo

    def _new_repo(self, repo_id: str, repo_type: str, private: bool, gated: bool, author: str) -> Repo:
        repo = self._repos[(repo_type, repo_id)] = Repo(repo_id, repo_type, private, gated)
        repo.branches["main"] = ""  # placeholder: the initial commit has no parent
        self._commit(repo, "main", "initial commit", {".gitattributes": self._store(GITATTRIBUTES, lfs=False)},
                     author=author)
        return repo

    def _seed_commit(self, repo_type: str, repo_id: str, branch: str, title: str,
                     files: dict[str, bytes | Path]) -> str:
        blobs = {}
        for path, src in files.items():
            size, sample = (len(src), src[:512]) if isinstance(src, bytes) else (src.stat().st_size, _head(src))
            blobs[path] = self._store(src, lfs=wants_lfs(path, size, sample))
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            repo.branches.setdefault(branch, repo.branches["main"])
            repo.lfs_oids.update(b.sha256 for b in blobs.values() if b.lfs)
            return self._commit(repo, branch, title, blobs, author="hub-seed")

    def _store(self, src: bytes | Path, *, lfs: bool) -> Blob:
        sha256, size = self._ingest([src] if isinstance(src, bytes) else _chunks(src))
        return self._blob(sha256, size, lfs)

    def _blob(self, sha256: str, size: int, lfs: bool) -> Blob:
        return Blob(sha256, size, lfs, _git_sha1(_lfs_pointer(sha256, size) if lfs else self._read_sha(sha256)))

    def _ingest(self, chunks: Iterable[bytes], expect: tuple[str, int] | None = None) -> tuple[str, int]:
        """Stream content into the object store (weights can be big); returns (sha256, size).
        Content that does not match `expect` is dropped."""
        digest, size = hashlib.sha256(), 0
        tmp = self._objects / f"incoming-{secrets.token_hex(8)}"
        try:
            with tmp.open("wb") as f:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
            if expect is not None and (digest.hexdigest(), size) != expect:
                raise HubError(400, f"Uploaded content does not match oid {expect[0]} and size {expect[1]}")
            os.replace(tmp, self._objects / digest.hexdigest())
            return digest.hexdigest(), size
        finally:
            tmp.unlink(missing_ok=True)

    def _read_sha(self, sha256: str) -> bytes:
        return (self._objects / sha256).read_bytes()

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        sha = repo.branches.get(revision) or (revision if revision in repo.commits else None)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[sha]

    def _commit(self, repo: Repo, branch: str, title: str, adds: dict[str, Blob], *, deletes: Sequence[str] = (),
                folder_deletes: Sequence[str] = (), description: str = "", parent: str | None = None,
                author: str) -> str:
        """Apply a commit atomically: the new tree is built aside and the branch moves only if all ops are valid."""
        with self._lock:
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = repo.commits.get(repo.branches[branch])
            if parent is not None and head is not None and parent != head.sha:
                raise HubError(412, f"Parent commit {parent} is not the head of {branch} ({head.sha})")
            tree = dict(head.tree) if head else {}
            for path in deletes:
                if tree.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            for folder in folder_deletes:
                prefix = folder.rstrip("/") + "/"
                tree = {p: b for p, b in tree.items() if not p.startswith(prefix)}
            tree.update(adds)
            sha = hashlib.sha1(f"{repo.repo_id}\n{branch}\n{title}\n{secrets.token_hex(16)}".encode()).hexdigest()
            deleted = sorted(set(head.tree if head else ()) - set(tree))
            repo.commits[sha] = Commit(sha, head.sha if head else None, title, description, author, _now(), tree,
                                       sorted(adds), deleted)
            repo.branches[branch] = sha
            return sha

    def _authenticate(self, authorization: str | None) -> User | None:
        if not authorization:
            return None
        token = authorization.removeprefix("Bearer ").strip()
        user = self._users.get(token)
        if user is None:  # like the Hub: a bad token is an error, not an anonymous request
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _readable(self, user: User | None, repo_type: str, repo_id: str) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not (user and user.can_write(repo.namespace))):
            # The Hub hides private repos: 401 when anonymous, 404 otherwise; both map to RepositoryNotFoundError.
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _writable(self, user: User | None, repo_type: str, repo_id: str) -> Repo:
        repo = self._readable(user, repo_type, repo_id)
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repo")
        if not user.can_write(repo.namespace):
            raise HubError(403, f"You don't have the rights to write to {repo_type} repo {repo_id}")
        return repo


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # snapshot_download opens several connections at once

    def __init__(self, hub: HubServer):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub
        self.connections: set[socket.socket] = set()

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        for conn in list(self.connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client pools connections
    timeout = 30  # idle keep-alive connections end after this
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    # -- plumbing --------------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        hub = self.server.hub
        url = urlsplit(self.path)
        hub.requests_log.append((self.command, url.path))
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self._body_read = False
        try:
            # Upload URLs are pre-authorized (the client sends no token there, like for S3 URLs).
            self.user = None if LFS_PUT_RE.match(url.path) else hub._authenticate(self.headers.get("Authorization"))
            if not hub._faults.apply(self, url.path):
                self._route(url.path)
        except (BrokenPipeError, ConnectionResetError):  # the client went away mid-response
            self.close_connection = True
            return
        except HubError as e:
            self._error(e)
        except Exception as e:  # a bug in the fake Hub: make it visible to the test as a 500
            self._error(HubError(500, f"hubserver bug: {type(e).__name__}: {e}"))
        if not self._body_read:  # drain what we did not read, to keep the connection usable
            try:
                for _ in self._body_chunks():
                    pass
            except (HubError, OSError, ValueError):
                self.close_connection = True

    def _body_chunks(self) -> Iterator[bytes]:
        self._body_read = True
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                yield self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                raise HubError(400, "Truncated request body")
            remaining -= len(chunk)
            yield chunk

    def _json_body(self) -> Any:
        try:
            return json.loads(b"".join(self._body_chunks()) or b"{}")
        except ValueError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from e

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, e: HubError) -> None:
        headers = {"X-Error-Message": " ".join(e.message.split()).encode("ascii", "replace").decode(), **e.headers}
        if e.code:
            headers["X-Error-Code"] = e.code
        self._json({"error": e.message, **e.extra}, e.status, headers)

    def _flag(self, name: str) -> bool:
        return self.query.get(name, "").lower() in ("1", "true")

    # -- routes ----------------------------------------------------------------------------------------------

    def _route(self, path: str) -> None:
        method, hub = self.command, self.server.hub
        if m := API_RE.match(path):
            return self._repo_api(TYPE_FROM_PLURAL[m[1]], m[2], [unquote(s) for s in (m[3] or "").split("/") if s])
        if m := RESOLVE_RE.match(path):
            if method in ("GET", "HEAD"):
                rev, filename = unquote(m[3]), "/".join(unquote(s) for s in m[4].split("/"))
                return self._resolve(TYPE_FROM_PLURAL.get(m[1] or "", "model"), m[2], rev, filename)
        elif (m := LFS_BATCH_RE.match(path)) and method == "POST":
            return self._lfs_batch(TYPE_FROM_PLURAL.get(m[1] or "", "model"), m[2])
        elif (m := LFS_PUT_RE.match(path)) and method == "PUT":
            return self._lfs_put(m[1])
        elif path == "/api/whoami-v2" and method == "GET":
            if self.user is None:
                raise HubError(401, "Unauthorized")
            orgs = [{"type": "org", "name": o, "fullname": o, "roleInOrg": "write"} for o in self.user.orgs]
            token: dict[str, Any] = {"displayName": "tests", "role": "write"}
            if not self.user.jobs:  # a fine-grained token: repos yes, job.write no
                token = {"displayName": "tests", "role": "fineGrained", "fineGrained": {
                    "canReadGatedRepos": True, "global": ["discussion.write", "post.write"],
                    "scoped": [{"entity": {"type": "user", "name": self.user.name},
                                "permissions": ["repo.content.read", "repo.write"]}]}}
            return self._json({"type": "user", "id": self.user.name, "name": self.user.name,
                               "fullname": self.user.name, "email": f"{self.user.name}@example.com",
                               "emailVerified": True, "canPay": False, "isPro": False, "orgs": orgs,
                               "avatarUrl": f"/avatars/{self.user.name}.svg",  # read by Gradio's mocked sign-in
                               "auth": {"type": "access_token", "accessToken": token}})
        elif path.startswith("/api/jobs/"):
            try:
                return hub.jobs.handle(self, path)
            except JobsError as e:
                raise HubError(e.status, e.message) from e
        elif path == "/api/repos/create" and method == "POST":
            return self._create_repo(self._json_body())
        elif path == "/api/repos/delete" and method == "DELETE":
            return self._delete_repo(self._json_body())
        elif path in ("/api/models", "/api/datasets", "/api/spaces") and method == "GET":
            return self._list_repos(TYPE_FROM_PLURAL[path.removeprefix("/api/")])
        elif path == "/api/validate-yaml" and method == "POST":
            self._json_body()
            return self._json({"errors": [], "warnings": []})
        elif path == "/api/agent-harnesses" and method == "GET":  # fetched for the User-Agent when telemetry is on
            return self._json({"standardEnvVars": [], "harnesses": {}})
        raise HubError(404, f"{method} {path} is not implemented by the test hub")

    def _create_repo(self, body: dict) -> None:
        hub = self.server.hub
        if self.user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        name, repo_type = str(body.get("name") or ""), body.get("type") or "model"
        namespace = body.get("organization") or self.user.name
        if not REPO_NAME_RE.match(name) or "--" in name or ".." in name or repo_type not in TYPE_PLURALS:
            raise HubError(400, f"Invalid repo name or type: {name!r} ({repo_type})")
        if not self.user.can_write(namespace):
            raise HubError(403, f"You don't have the rights to create a {repo_type} "
                                f'under the namespace "{namespace}"')
        repo_id = f"{namespace}/{name}"
        url = f"{hub.url}/{URL_PREFIX[repo_type]}{repo_id}"
        private = body.get("visibility") == "private" or body.get("private") is True
        with hub._lock:
            if (repo_type, repo_id) in hub._repos:
                # The client reads "url" from the 409 body when exist_ok=True.
                raise HubError(409, f"You already created this {repo_type} repo: {repo_id}", extra={"url": url})
            hub._new_repo(repo_id, repo_type, private, gated=False, author=self.user.name)
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self, body: dict) -> None:
        hub = self.server.hub
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or (self.user.name if self.user else '')}/{body.get('name')}"
        hub._writable(self.user, repo_type, repo_id)
        with hub._lock:
            del hub._repos[(repo_type, repo_id)]
        self._json({})

    def _list_repos(self, repo_type: str) -> None:
        hub, search, author = self.server.hub, self.query.get("search", "").lower(), self.query.get("author")
        with hub._lock:
            repos = [r for (t, _), r in sorted(hub._repos.items()) if t == repo_type and search in r.repo_id.lower()
                     and (author is None or r.namespace == author)
                     and (not r.private or (self.user and self.user.can_write(r.namespace)))]
            items = [{"id": r.repo_id, "author": r.namespace, "private": r.private, "sha": r.branches["main"],
                      "gated": "auto" if r.gated else False, "lastModified": r.commits[r.branches["main"]].date,
                      "likes": 0, "downloads": 0, "tags": []} for r in repos]
        self._json(items[: int(self.query["limit"])] if "limit" in self.query else items)

    def _repo_api(self, repo_type: str, repo_id: str, segs: list[str]) -> None:
        hub, method = self.server.hub, self.command
        action, rev = (segs[0] if segs else ""), (segs[1] if len(segs) > 1 else "main")
        if action in ("xet-write-token", "xet-read-token"):
            raise HubError(501, "The test hub does not support Xet: set HF_HUB_DISABLE_XET=1 (see hub_fixtures.py)")
        body = self._json_body() if (method, action) == ("POST", "preupload") else {}
        with hub._lock:  # reads see a consistent snapshot; writes re-take the (reentrant) lock
            if method == "GET" and action in ("", "revision"):
                repo = hub._readable(self.user, repo_type, repo_id)
                return self._json(self._info(repo, hub._commit_at(repo, rev), self._flag("blobs")))
            if method == "GET" and action == "tree":
                commit = hub._commit_at(hub._readable(self.user, repo_type, repo_id), rev)
                return self._json(self._tree(commit, "/".join(segs[2:]), self._flag("recursive")))
            if method == "POST" and action == "preupload":
                head = hub._commit_at(hub._writable(self.user, repo_type, repo_id), rev)
                files = [{"path": f["path"], "shouldIgnore": False,
                          "uploadMode": "lfs" if wants_lfs(f["path"], f["size"], base64.b64decode(f["sample"]))
                          else "regular", "oid": head.tree[f["path"]].oid if f["path"] in head.tree else None}
                         for f in body.get("files", [])]
                return self._json({"files": files, "commitOid": head.sha})
        if method == "POST" and action == "commit":
            return self._commit(repo_type, repo_id, rev)
        raise HubError(404, f"{method} /api/{TYPE_PLURALS[repo_type]}/{repo_id}/{'/'.join(segs)} is not implemented")

    def _info(self, repo: Repo, commit: Commit, blobs: bool) -> dict:
        siblings = []
        for path, blob in sorted(commit.tree.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=blob.size, blobId=blob.blob_id)
                if blob.lfs:
                    sibling["lfs"] = {"sha256": blob.sha256, "size": blob.size,
                                      "pointerSize": len(_lfs_pointer(blob.sha256, blob.size))}
            siblings.append(sibling)
        return {"_id": repo.repo_id, "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.namespace,
                "sha": commit.sha, "lastModified": commit.date, "createdAt": repo.created_at,
                "private": repo.private, "gated": "auto" if repo.gated else False, "disabled": False,
                "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
                "usedStorage": sum(b.size for b in commit.tree.values())}

    def _tree(self, commit: Commit, folder: str, recursive: bool) -> list[dict]:
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        entries: dict[str, dict] = {}
        for path, blob in commit.tree.items():
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                sub = prefix + "/".join(parts[:depth])
                entries[sub] = {"type": "directory", "path": sub, "oid": _git_sha1(f"{commit.sha}:{sub}".encode())}
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "path": path, "oid": blob.blob_id, "size": blob.size}
                if blob.lfs:
                    entries[path]["lfs"] = {"oid": blob.sha256, "size": blob.size,
                                            "pointerSize": len(_lfs_pointer(blob.sha256, blob.size))}
        if prefix and not entries:
            raise HubError(404, f"Folder {folder} not found at {commit.sha}", "EntryNotFound")
        return sorted(entries.values(), key=lambda e: e["path"])

    def _commit(self, repo_type: str, repo_id: str, branch: str) -> None:
        hub = self.server.hub
        with hub._lock:
            repo = hub._writable(self.user, repo_type, repo_id)
        if self._flag("create_pr"):
            raise HubError(501, "Pull requests are not supported by the test hub")
        try:
            items = [json.loads(line) for line in b"".join(self._body_chunks()).splitlines() if line.strip()]
        except ValueError as e:
            raise HubError(400, f"Invalid NDJSON commit payload: {e}") from e
        if not items or items[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        header = items[0]["value"]
        adds: dict[str, Blob] = {}
        deletes: list[str] = []
        folder_deletes: list[str] = []
        for item in items[1:]:
            key, value = item.get("key"), item.get("value", {})
            path = value.get("path", "")
            if key == "file":
                content = value.get("content", "")
                data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                adds[path] = hub._store(data, lfs=False)
            elif key == "lfsFile":
                oid, obj = value.get("oid", ""), hub._objects / value.get("oid", "missing")
                if oid not in repo.lfs_oids or not obj.exists():
                    raise HubError(400, f"Your push was rejected: LFS object {oid} of {path} was never uploaded")
                size = obj.stat().st_size
                if value.get("size") not in (None, size):
                    raise HubError(400, f"Size mismatch for LFS object {oid} of {path}: {value['size']} != {size}")
                adds[path] = hub._blob(oid, size, lfs=True)
            elif key == "deletedFile":
                deletes.append(path)
            elif key == "deletedFolder":
                folder_deletes.append(path)
            else:
                raise HubError(400, f"Unknown commit operation: {key}")
        author = self.user.name if self.user else "anonymous"
        sha = hub._commit(repo, branch, header.get("summary") or "Commit", adds, deletes=deletes,
                          folder_deletes=folder_deletes, description=header.get("description", ""),
                          parent=header.get("parentCommit"), author=author)
        self._json({"success": True, "commitOid": sha, "pullRequestUrl": None, "hookOutput": "",
                    "commitUrl": f"{hub.url}/{URL_PREFIX[repo_type]}{repo_id}/commit/{sha}"})

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        hub, body = self.server.hub, self._json_body()
        if body.get("operation") != "upload":
            raise HubError(400, "Only the LFS 'upload' operation is supported by the test hub")
        objects = []
        with hub._lock:
            repo = hub._writable(self.user, repo_type, repo_id)
            for obj in body.get("objects", []):
                oid, size = obj.get("oid"), obj.get("size")
                if not (isinstance(oid, str) and re.fullmatch(r"[0-9a-f]{64}", oid) and isinstance(size, int)):
                    objects.append({"oid": str(oid), "size": -1, "error": {"code": 422, "message": "Invalid object"}})
                elif oid in repo.lfs_oids:  # already there: no action, the client skips the upload
                    objects.append({"oid": oid, "size": size})
                else:
                    ticket = secrets.token_hex(16)
                    hub._uploads[ticket] = ((repo_type, repo_id), oid, size)
                    objects.append({"oid": oid, "size": size, "authenticated": True,
                                    "actions": {"upload": {"href": f"{hub.url}/_lfs/{ticket}", "expires_in": 3600}}})
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, ticket: str) -> None:
        hub = self.server.hub
        with hub._lock:
            upload = hub._uploads.get(ticket)
        if upload is None:
            raise HubError(403, "Unknown or expired upload URL")
        key, oid, size = upload
        hub._ingest(self._body_chunks(), expect=(oid, size))
        with hub._lock:
            hub._uploads.pop(ticket, None)
            if key in hub._repos:
                hub._repos[key].lfs_oids.add(oid)
        self._send(200, b"", {"ETag": f'"{oid}"'})

    def _resolve(self, repo_type: str, repo_id: str, revision: str, filename: str) -> None:
        hub = self.server.hub
        with hub._lock:
            repo = hub._readable(self.user, repo_type, repo_id)
            hub._check_gate(self.user, repo)
            commit = hub._commit_at(repo, revision)
        headers = {"X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
        blob = commit.tree.get(filename)
        if blob is None:  # X-Repo-Commit lets the client cache the file's absence
            raise HubError(404, f"Entry not found: {filename}", "EntryNotFound", headers=headers)
        headers["ETag"] = f'"{blob.sha256 if blob.lfs else blob.blob_id}"'
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
        start, end, status = 0, blob.size - 1, 200
        if (rng := self.headers.get("Range")) and self.command == "GET":
            m = RANGE_RE.match(rng.strip())
            if not m or not (m[1] or m[2]):
                raise HubError(416, f"Unsupported range: {rng}", headers={"Content-Range": f"bytes */{blob.size}"})
            if m[1]:
                start, end = int(m[1]), min(int(m[2]) if m[2] else end, end)
            else:  # suffix range: the last N bytes
                start = max(blob.size - int(m[2]), 0)
            if start > end:
                raise HubError(416, f"Unsatisfiable range: {rng}", headers={"Content-Range": f"bytes */{blob.size}"})
            status, headers["Content-Range"] = 206, f"bytes {start}-{end}/{blob.size}"
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if self.command == "GET":
            with (hub._objects / blob.sha256).open("rb") as f:
                f.seek(start)
                remaining = end - start + 1
                while remaining > 0 and (chunk := f.read(min(remaining, 1 << 20))):
                    self.wfile.write(chunk)
                    remaining -= len(chunk)


# == Fault injection ==============================================================================================
# Kept apart from the protocol above. `hub.inject(path_regex, faults, method=None)` queues faults for the
# requests whose (URL-quoted) path matches; each matching request consumes one, in order:
#   503, 500, 429, ...        answered with that status instead of being handled (nothing happens on the Hub);
#   {"status": 429, "retry_after": 2}   the same, with a Retry-After header (seconds);
#   "drop"                    handled (a commit lands, a file is served), then the connection is closed before
#                             any response byte: the client never learns the outcome;
#   "truncate"                handled; the response's headers and half of its body are sent, then the
#                             connection is closed (fewer bytes than Content-Length).
#   "corrupt"                 handled; the body's bytes are flipped (same length): only a hash check sees it.

Fault = Any  # int | dict | str, as above


class _FaultyWriter:
    """Wraps a handler's wfile to cut or spoil what the handler sends."""

    def __init__(self, handler: BaseHTTPRequestHandler, mode: str):
        self._handler, self._real, self._mode = handler, handler.wfile, mode
        self._headers_sent = False
        self._body_left: int | None = None

    def _cut(self) -> None:
        try:
            self._handler.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raise ConnectionResetError("connection cut by an injected fault")

    def write(self, data: bytes) -> int:
        if self._mode == "drop":
            self._cut()
        if not self._headers_sent:  # BaseHTTPRequestHandler flushes all headers in one write
            self._headers_sent = True
            m = re.search(rb"\r\ncontent-length: *(\d+)", bytes(data), re.I)
            self._body_left = int(m[1]) // 2 if m else 0
            return self._real.write(data)
        if self._mode == "corrupt":
            return self._real.write(bytes(b ^ 0xFF for b in data))
        assert self._body_left is not None
        if len(data) >= self._body_left:
            self._real.write(bytes(data)[: self._body_left])
            self._real.flush()
            self._cut()
        self._body_left -= len(data)
        return self._real.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class FaultPlan:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[tuple[re.Pattern[str], str | None, bool, list[Fault]]] = []
        self.log: list[tuple[str, str, str]] = []

    def add(self, path_regex: str, faults: Sequence[Fault], method: str | None, whole_files: bool = False) -> None:
        with self._lock:
            self._rules.append((re.compile(path_regex), method.upper() if method else None, whole_files,
                                list(faults)))

    def _take(self, method: str, path: str, ranged: bool) -> Fault | None:
        with self._lock:
            for regex, want, whole_files, faults in self._rules:
                if faults and (want is None or want == method) and regex.search(path) and not (whole_files and ranged):
                    fault = faults.pop(0)
                    self.log.append((method, path, str(fault)))
                    return fault
        return None

    def apply(self, handler: Any, path: str) -> bool:
        """Serve the next fault for this request, if any; True when the request was answered by it."""
        fault = self._take(handler.command, path, "range" in {k.lower() for k in handler.headers.keys()})
        if fault is None:
            return False
        if isinstance(fault, str):
            if fault not in ("drop", "truncate", "corrupt"):
                raise ValueError(f"unknown fault {fault!r}")
            handler.wfile = _FaultyWriter(handler, fault)
            handler.close_connection = True
            return False  # handled as usual; the writer spoils the answer
        status, retry_after = (fault["status"], fault.get("retry_after")) if isinstance(fault, dict) else (fault, None)
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        raise HubError(int(status), f"Injected fault: HTTP {status}", headers=headers)
