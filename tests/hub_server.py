"""A loopback stand-in for the Hugging Face Hub, so publishing can be tested without the internet.

It speaks the part of the Hub's HTTP protocol that ``huggingface_hub``'s ``HfApi`` uses to publish a
model when Xet storage is disabled (``HF_HUB_DISABLE_XET=1``; the Xet path talks to a separate
content-addressed store and is not emulated):

    GET  /api/whoami-v2                                  who the token belongs to
    POST /api/repos/create                               create_repo (409 with the url if it exists)
    GET  /api/models/{repo_id}[/revision/{rev}]          repo_info
    POST /api/models/{repo_id}/branch/{branch}           create_branch
    POST /api/validate-yaml                              README.md metadata check done by upload_folder
    POST /api/models/{repo_id}/preupload/{rev}           "regular" (inline base64) or "lfs", per file
    POST /{repo_id}.git/info/lfs/objects/batch           LFS batch API: where to PUT each large file
    PUT  /lfs-storage/{oid}                              basic transfer: the whole file in one PUT
    PUT  /lfs-storage/{oid}/part/{n}, POST .../complete  multipart transfer (when enabled)
    POST /{repo_id}.git/info/lfs/objects/verify          the client's check after an upload
    POST /api/models/{repo_id}/commit/{rev}              NDJSON commit (header, file, lfsFile, deleted*)

Like the Hub, it decides which files go through LFS: those larger than 10 MiB and those matching the
``*.ext filter=lfs`` lines of the revision's ``.gitattributes`` (a new repository gets the Hub's
default one). LFS PUTs carry no Authorization header, as with the Hub's pre-signed storage URLs.

Every request is recorded (method, path with query, headers, body) so tests can check where a token
travelled, and every repository keeps its commits, so tests can compare what arrived byte for byte.
The server binds 127.0.0.1 on a free port, refuses bodies over ``max_body_bytes``, and is started and
stopped by the test that uses it::

    with FakeHub(tokens={"hf_test": "alice"}) as hub:
        HfApi(endpoint=hub.url, token="hf_test").create_repo("alice/tiny")
        assert "alice/tiny" in hub.repos
"""
from __future__ import annotations

import base64
import fnmatch
import hashlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

MiB = 1024 * 1024

# The Hub's default .gitattributes for a new model repository (abridged to the weight formats).
DEFAULT_GITATTRIBUTES = "".join(
    f"*.{suffix} filter=lfs diff=lfs merge=lfs -text\n"
    for suffix in ("bin", "safetensors", "pt", "pth", "ckpt", "h5", "msgpack", "onnx", "gguf", "zip", "npy"))


@dataclass
class RecordedRequest:
    method: str
    path: str  # as sent, query string included
    headers: dict[str, str]  # lower-cased names
    body: bytes


@dataclass
class Commit:
    oid: str
    summary: str
    description: str
    parent: str | None
    tree: dict[str, bytes]  # the whole repository after this commit


@dataclass
class Repo:
    repo_id: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # "main", "refs/pr/1", ... -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    pull_requests: int = 0


@dataclass
class Failure:
    """An error the fake Hub answers instead of the real response (see ``FakeHub.fail``)."""

    method: str
    path_pattern: re.Pattern
    status: int
    error_code: str | None
    message: str


class HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code, self.body = status, message, error_code, body


class FakeHub:
    """A thread serving the Hub protocol subset above on ``http://127.0.0.1:<free port>``.

    ``tokens`` maps each accepted token to its user name; a user may write to its own namespace and
    to ``orgs``. ``multipart_chunk_size`` makes LFS files larger than it go through the multipart
    transfer, as the Hub does for large files.
    """

    def __init__(self, tokens: dict[str, str] | None = None, orgs: tuple[str, ...] = (),
                 lfs_threshold: int = 10 * MiB, multipart_chunk_size: int | None = None,
                 max_body_bytes: int = 256 * MiB):
        self.tokens = dict(tokens or {})
        self.orgs = tuple(orgs)
        self.lfs_threshold = lfs_threshold
        self.multipart_chunk_size = multipart_chunk_size
        self.max_body_bytes = max_body_bytes
        self.requests: list[RecordedRequest] = []
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 hex -> content
        self.failures: list[Failure] = []
        self.server_errors: list[str] = []  # bugs in this fake, answered with 500; tests expect none
        self._parts: dict[tuple[str, int], bytes] = {}
        self._lock = threading.Lock()
        self._oids = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeHub is not running; use it as a context manager or call start()")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        handler = type("BoundHubHandler", (_HubHandler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        # A short poll interval keeps stop() (which waits for the next poll) from slowing every test.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.01},
                                        name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- what tests look at ----------------------------------------------------------------------

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Every file of ``repo_id`` at ``revision`` (a branch or ``refs/pr/N``), path -> bytes."""
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.refs[revision]].tree)

    def head(self, repo_id: str, revision: str = "main") -> Commit:
        repo = self.repos[repo_id]
        return repo.commits[repo.refs[revision]]

    def add_repo(self, repo_id: str, private: bool = False) -> Repo:
        """A repository that exists before the test pushes (with the Hub's initial commit)."""
        with self._lock:
            return self._create_repo(repo_id, private)

    def fail(self, method: str, path_pattern: str, status: int, error_code: str | None = None,
             message: str = "refused by the test") -> None:
        """Answer every ``method`` request whose path matches ``path_pattern`` (a regex) with ``status``."""
        self.failures.append(Failure(method, re.compile(path_pattern), status, error_code, message))

    # ---- protocol --------------------------------------------------------------------------------

    def _new_oid(self, *parts: str) -> str:
        return hashlib.sha1("\0".join((str(next(self._oids)),) + parts).encode()).hexdigest()

    def _create_repo(self, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_id, private)
        initial = Commit(self._new_oid(repo_id), "initial commit", "", None,
                         {".gitattributes": DEFAULT_GITATTRIBUTES.encode()})
        repo.commits[initial.oid] = initial
        repo.refs["main"] = initial.oid
        self.repos[repo_id] = repo
        return repo

    def _user(self, headers: dict[str, str]) -> str:
        authorization = headers.get("authorization", "")
        token = authorization.removeprefix("Bearer ").strip() if authorization.startswith("Bearer ") else None
        if token is None:
            raise HubError(401, "Invalid username or password.")
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def _can_write(self, user: str, repo_id: str) -> bool:
        return repo_id.split("/")[0] in (user, *self.orgs)

    def _readable_repo(self, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and (user is None or not self._can_write(user, repo_id))):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _writable_repo(self, repo_id: str, user: str) -> Repo:
        repo = self._readable_repo(repo_id, user)
        if not self._can_write(user, repo_id):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _is_lfs(self, tree: dict[str, bytes], path: str, size: int) -> bool:
        if size > self.lfs_threshold:
            return True
        patterns = [line.split()[0] for line in tree.get(".gitattributes", b"").decode().splitlines()
                    if "filter=lfs" in line]
        name = path.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)

    def handle(self, method: str, raw_path: str, headers: dict[str, str], body: bytes):
        """Route one request; returns (status, json-able payload or None, extra headers)."""
        url = urlsplit(raw_path)
        path, query = url.path, parse_qs(url.query)
        for failure in self.failures:
            if failure.method == method and failure.path_pattern.search(path):
                raise HubError(failure.status, failure.message, failure.error_code)

        if method == "PUT" and (match := re.fullmatch(r"/lfs-storage/([0-9a-f]{64})(?:/part/(\d+))?", path)):
            return self._store_lfs(match[1], None if match[2] is None else int(match[2]), body)
        if method == "POST" and (match := re.fullmatch(r"/lfs-storage/([0-9a-f]{64})/complete", path)):
            return self._complete_multipart(match[1], json.loads(body))

        user = self._user(headers)  # everything else needs a valid token
        is_json = headers.get("content-type", "").split(";")[0] in ("application/json", "application/vnd.git-lfs+json")
        payload = json.loads(body) if body and is_json else None

        if method == "GET" and path == "/api/whoami-v2":
            return 200, {"type": "user", "name": user, "orgs": [{"name": org} for org in self.orgs],
                         "auth": {"type": "access_token", "accessToken": {"role": "write"}}}, {}
        if method == "POST" and path == "/api/repos/create":
            return self._route_create_repo(user, payload)
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}, {}
        if method == "GET" and (match := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)):
            repo = self._readable_repo(match[1], user)
            revision = unquote(match[2] or "main")
            if revision not in repo.refs:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            commit = repo.commits[repo.refs[revision]]
            return 200, {"id": repo.repo_id, "private": repo.private, "sha": commit.oid,
                         "siblings": [{"rfilename": name} for name in sorted(commit.tree)]}, {}
        if method == "POST" and (match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/([^/]+)", path)):
            return self._route_create_branch(user, match[1], unquote(match[2]), payload or {})
        if method == "POST" and (match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path)):
            return self._route_preupload(user, match[1], unquote(match[2]), payload, "create_pr" in query)
        if method == "POST" and (match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path)):
            return self._route_commit(user, match[1], unquote(match[2]), body, "create_pr" in query)
        if method == "POST" and (match := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)):
            return self._route_lfs_batch(user, match[1], payload)
        if method == "POST" and (match := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/verify", path)):
            self._writable_repo(match[1], user)
            if payload.get("oid") not in self.lfs_objects:
                raise HubError(404, f"LFS object {payload.get('oid')} was never uploaded")
            return 200, {}, {}
        raise HubError(404, f"the fake Hub does not serve {method} {path}")

    def _route_create_repo(self, user: str, payload: dict):
        if payload.get("type", "model") != "model":
            raise HubError(400, "the fake Hub only hosts model repositories")
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        repo_url = f"{self.url}/{repo_id}"
        if not self._can_write(user, repo_id):
            raise HubError(403, f"You don't have the rights to create a model under the namespace "
                                f"\"{repo_id.split('/')[0]}\"")
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", body={"url": repo_url})
        self._create_repo(repo_id, payload.get("visibility") == "private")
        return 200, {"url": repo_url, "name": repo_id, "id": repo_id}, {}

    def _route_create_branch(self, user: str, repo_id: str, branch: str, payload: dict):
        repo = self._writable_repo(repo_id, user)
        if branch in repo.refs:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = payload.get("startingPoint", "main")
        oid = repo.refs.get(start, start if start in repo.commits else None)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {start}", "RevisionNotFound")
        repo.refs[branch] = oid
        return 200, {}, {}

    def _route_preupload(self, user: str, repo_id: str, revision: str, payload: dict, create_pr: bool):
        repo = self._writable_repo(repo_id, user)
        if revision not in repo.refs:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        tree = repo.commits[repo.refs[revision]].tree
        files = [{"path": entry["path"], "shouldIgnore": False, "oid": None,
                  "uploadMode": "lfs" if self._is_lfs(tree, entry["path"], entry["size"]) else "regular"}
                 for entry in payload["files"]]
        return 200, {"files": files, "commitOid": repo.refs[revision]}, {}

    def _route_lfs_batch(self, user: str, repo_id: str, payload: dict):
        self._writable_repo(repo_id, user)
        if payload.get("operation") != "upload":
            raise HubError(400, "the fake Hub only accepts LFS uploads")
        objects = []
        for item in payload["objects"]:
            oid, size = item["oid"], item["size"]
            entry = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.lfs_objects:  # no "actions": the content is already stored
                storage = f"{self.url}/lfs-storage/{oid}"
                verify = {"href": f"{self.url}/{repo_id}.git/info/lfs/objects/verify"}
                chunk = self.multipart_chunk_size
                if chunk and size > chunk:
                    parts = {str(number): f"{storage}/part/{number}" for number in range(1, -(-size // chunk) + 1)}
                    upload = {"href": f"{storage}/complete", "header": {"chunk_size": str(chunk), **parts}}
                else:
                    upload = {"href": storage}
                entry["actions"] = {"upload": upload, "verify": verify}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}

    def _store_lfs(self, oid: str, part: int | None, body: bytes):
        if part is not None:
            self._parts[(oid, part)] = body
            return 200, None, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"content does not hash to {oid}")
        self.lfs_objects[oid] = body
        return 200, None, {}

    def _complete_multipart(self, oid: str, payload: dict):
        numbers = [part["partNumber"] for part in payload["parts"]]
        content = b"".join(self._parts.pop((oid, number)) for number in numbers)
        return self._store_lfs(oid, None, content)

    def _route_commit(self, user: str, repo_id: str, revision: str, body: bytes, create_pr: bool):
        repo = self._writable_repo(repo_id, user)
        if revision not in repo.refs:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        parent = repo.commits[repo.refs[revision]]
        tree = dict(parent.tree)
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                tree[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    raise HubError(422, f"{value['path']}: LFS object {value['oid']} was never uploaded")
                tree[value["path"]] = self.lfs_objects[value["oid"]]
            elif key == "deletedFile":
                tree.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                tree = {path: data for path, data in tree.items() if not path.startswith(prefix)}
        commit = Commit(self._new_oid(repo_id, header["summary"]), header["summary"],
                        header.get("description", ""), parent.oid, tree)
        repo.commits[commit.oid] = commit
        answer = {"commitUrl": f"{self.url}/{repo_id}/commit/{commit.oid}", "commitOid": commit.oid,
                  "success": True}
        if create_pr:
            repo.pull_requests += 1
            repo.refs[f"refs/pr/{repo.pull_requests}"] = commit.oid
            answer["pullRequestUrl"] = f"{self.url}/{repo_id}/discussions/{repo.pull_requests}"
        else:
            repo.refs[revision] = commit.oid
        return 200, answer, {}


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every answer carries Content-Length
    timeout = 10  # an idle kept-alive connection is dropped after this many seconds
    # Send each answer in one write, at once: written piecemeal, Nagle's algorithm and delayed ACKs
    # hold every response on loopback for ~40 ms.
    wbufsize = -1
    disable_nagle_algorithm = True
    hub: FakeHub

    def log_message(self, format, *args):  # quiet: requests are recorded in hub.requests instead
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                total += size
                if total > self.hub.max_body_bytes:
                    raise HubError(413, "request body too large for the fake Hub")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.hub.max_body_bytes:
            raise HubError(413, "request body too large for the fake Hub")
        return self.rfile.read(length)

    def _answer(self, status: int, payload, headers: dict[str, str]) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if payload is not None and "Content-Type" not in headers:
            self.send_header("Content-Type", "application/json")
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        try:
            body = self._read_body()
        except HubError as error:
            self.close_connection = True
            self._answer(error.status, {"error": error.message}, {"X-Error-Message": error.message})
            return
        hub = self.hub
        with hub._lock:
            hub.requests.append(RecordedRequest(self.command, self.path, headers, body))
            try:
                status, payload, extra = hub.handle(self.command, self.path, headers, body)
            except HubError as error:
                status, payload = error.status, {"error": error.message, **(error.body or {})}
                extra = {"X-Error-Message": error.message}
                if error.error_code:
                    extra["X-Error-Code"] = error.error_code
            except Exception as error:  # a bug in the fake, or a request it does not understand
                hub.server_errors.append(f"{self.command} {self.path}: {type(error).__name__}: {error}")
                status, payload, extra = 500, {"error": f"fake Hub failure: {error}"}, {}
        self._answer(status, payload, extra)

    do_GET = do_POST = do_PUT = _dispatch
