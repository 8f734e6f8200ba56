"""An in-process fake of the Hugging Face Hub API, so tests can push and pull model repos offline.

`FakeHub` speaks just enough of the Hub's HTTP API for the real `huggingface_hub` client (2.x) to run, on
model repos and Spaces, `create_repo`, `upload_folder`/`upload_file`/`create_commit`, `hf_hub_download`, `snapshot_download`,
`model_info`, `list_repo_files`/`list_repo_tree`, `list_repo_refs`, `list_repo_commits` and `whoami`.
Every file travels base64-encoded inside the commit (the server answers "regular" to every preupload
query), so neither Git LFS nor Xet storage is involved. `use_hub` points the client at the server and
`fake_hub` is a pytest fixture doing both.
"""

import base64
import contextlib
import hashlib
import json
import os
import re
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from huggingface_hub import constants, hf_api
from huggingface_hub.utils import close_session

DEFAULT_USERS = {"alice": "hf_alice_token", "bob": "hf_bob_token"}
BRANCH = "main"  # the only branch: commits always go to it, downloads may also name any commit sha
# What the real Hub puts in the initial commit of every new repo (abridged).
GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha(data: bytes) -> str:
    """The git object id of a file: what the Hub uses as ETag and tree `oid` of non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Commit:
    """One commit of a repo, with its whole file tree."""

    sha: str
    title: str
    message: str
    author: str
    date: str
    files: dict[str, bytes]  # path -> content


@dataclass
class Repo:
    """A model repo or a Space, and its history."""

    repo_id: str
    owner: str  # the only user who can write, and read when private
    private: bool
    created_at: str = field(default_factory=_now)
    commits: list[Commit] = field(default_factory=list)  # oldest first; the last one is the head of "main"


class _HubError(Exception):
    """An error answer: `code` goes in `X-Error-Code`, which is what the client maps to its exception types."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None,
                 **extra: Any):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = headers or {}, extra


def _repo_not_found(user: str | None) -> _HubError:
    # Like the Hub: 401 when anonymous, 404 otherwise, and the same answer for private and missing repos.
    return _HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")


class _Handler(BaseHTTPRequestHandler):
    """Turns HTTP requests into `FakeHub.dispatch` calls (HTTP/1.0: one request per connection, so
    no keep-alive connection outlives `stop`)."""

    server: "FakeHub"

    def _serve(self) -> None:
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))  # the client never sends chunked
        auth = self.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() or None
        self.server.request_log.append((self.client_address[0], self.command, self.path))
        status, headers, payload = self.server.dispatch(self.command, url.path, parse_qs(url.query), token, body)
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))  # also on HEAD: the client reads the size from it
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_POST = _serve

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: `request_log` records the traffic."""


_REPO = r"(?P<repo_id>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"
_KIND = r"(?P<kind>models|spaces)"


class FakeHub(ThreadingHTTPServer):
    """An in-memory Hub on 127.0.0.1 (free port), served from a daemon thread.

    Use as a context manager (or `start`/`stop`). `users` maps user names to tokens; requests authenticate
    with `Authorization: Bearer <token>`, and an unknown token counts as anonymous. `repos` holds the
    state, keyed by repo id (Spaces by "spaces/" + id, their `sdk` in `space_sdks`); `request_log` lists `(client host, method, path)` of every request.
    """

    daemon_threads = True

    def __init__(self, users: dict[str, str] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self.users = dict(DEFAULT_USERS if users is None else users)
        self.repos: dict[str, Repo] = {}
        self.space_sdks: dict[str, str] = {}
        self.request_log: list[tuple[str, str, str]] = []
        self._user_by_token = {token: user for user, token in self.users.items()}
        self._lock = threading.Lock()  # handlers run in parallel threads (snapshot_download downloads in a pool)
        self._thread: threading.Thread | None = None
        self._routes: list[tuple[str, re.Pattern[str], Callable[..., Any]]] = [
            ("POST", re.compile(r"/api/repos/create"), self._create_repo),
            ("POST", re.compile(r"/api/validate-yaml"), self._validate_yaml),
            ("GET", re.compile(r"/api/whoami-v2"), self._whoami),
            ("GET", re.compile(rf"/api/{_KIND}/{_REPO}(?:/revision/{_REV})?"), self._model_info),
            ("GET", re.compile(rf"/api/{_KIND}/{_REPO}/tree/{_REV}(?:/(?P<path>.*))?"), self._tree),
            ("GET", re.compile(rf"/api/{_KIND}/{_REPO}/refs"), self._refs),
            ("GET", re.compile(rf"/api/{_KIND}/{_REPO}/commits/{_REV}"), self._commits),
            ("POST", re.compile(rf"/api/{_KIND}/{_REPO}/preupload/{_REV}"), self._preupload),
            ("POST", re.compile(rf"/api/{_KIND}/{_REPO}/commit/{_REV}"), self._commit),
            ("GET", re.compile(rf"/(?:(?P<kind>spaces)/)?{_REPO}/resolve/{_REV}/(?P<path>.+)"), self._resolve),
        ]

    # -- lifecycle

    def start(self) -> "FakeHub":
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:  # `shutdown` would wait forever for a loop that never ran
            self.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- plumbing

    def dispatch(self, method: str, path: str, query: dict[str, list[str]], token: str | None,
                 body: bytes) -> tuple[int, dict[str, str], bytes]:
        """Answer one request: `(status, headers, body)`."""
        user = self._user_by_token.get(token or "")
        for route_method, pattern, handler in self._routes:
            match = pattern.fullmatch(path)
            if match and (method == route_method or (method, route_method) == ("HEAD", "GET")):
                args = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                if args.pop("kind", "models") == "spaces":  # Spaces live beside the models, under their own keys
                    args["repo_id"] = f"spaces/{args['repo_id']}"
                break
        else:
            return self._error(_HubError(404, f"FakeHub does not implement {method} {path}"))
        try:
            answer = handler(user=user, query=query, body=body, **args)
        except _HubError as error:
            return self._error(error)
        except Exception:  # a FakeHub bug: show the traceback in the client's exception message
            return self._error(_HubError(500, traceback.format_exc()))
        status, headers, payload = answer if isinstance(answer, tuple) else (200, {}, answer)
        return status, headers, payload if isinstance(payload, bytes) else json.dumps(payload).encode()

    @staticmethod
    def _error(error: _HubError) -> tuple[int, dict[str, str], bytes]:
        headers = dict(error.headers)
        if error.code is not None:
            headers["X-Error-Code"] = error.code
        # Headers are latin-1 on the wire: keep the (last line of the) message ASCII; the body has it all.
        headers["X-Error-Message"] = error.message.splitlines()[-1].encode("ascii", "replace").decode()
        return error.status, headers, json.dumps({"error": error.message, **error.extra}).encode()

    def _readable(self, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            raise _repo_not_found(user)
        return repo

    def _writable(self, repo_id: str, user: str | None, rev: str) -> Repo:
        repo = self._readable(repo_id, user)
        if user != repo.owner:
            raise _HubError(401 if user is None else 403, f"You don't have the rights to write to {repo_id}")
        if rev != BRANCH:
            raise _HubError(404, f"Invalid rev id: {rev} (FakeHub only commits to '{BRANCH}')", "RevisionNotFound")
        return repo

    @staticmethod
    def _at(repo: Repo, rev: str | None) -> Commit:
        """The commit a revision names: the branch head, or any commit by full sha."""
        if rev in (None, BRANCH):
            return repo.commits[-1]
        for commit in repo.commits:
            if commit.sha == rev:
                return commit
        raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _add_commit(self, repo: Repo, author: str, title: str, message: str, files: dict[str, bytes]) -> Commit:
        parent = repo.commits[-1].sha if repo.commits else ""
        seed = "\0".join([repo.repo_id, parent, str(len(repo.commits)), title, *map(git_blob_sha, files.values())])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), title, message, author, _now(), files)
        repo.commits.append(commit)
        return commit

    # -- endpoints (keyword arguments: user, query, body, and the route's groups)

    def _create_repo(self, user: str | None, body: bytes, **_: Any) -> dict:
        if user is None:
            raise _HubError(401, "Invalid credentials in Authorization header")
        request = json.loads(body)
        kind = request.get("type", "model")
        if kind not in ("model", "space"):
            raise _HubError(400, "FakeHub only serves model repos and Spaces")
        if kind == "space" and not request.get("sdk"):
            raise _HubError(400, "A Space needs an sdk (gradio, docker or static)")
        namespace = request.get("organization") or user
        if namespace != user and namespace in self.users:  # other names count as organizations anyone may use
            raise _HubError(403, f"You don't have the rights to create a model under the namespace {namespace}")
        repo_id = f"{namespace}/{request['name']}"
        key = repo_id if kind == "model" else f"spaces/{repo_id}"
        url = f"{self.endpoint}/{key}"
        with self._lock:
            if key in self.repos:  # the 409 body carries the url so that `exist_ok=True` can build its RepoUrl
                raise _HubError(409, f"You already created this {kind} repo", url=url)
            private = request.get("visibility") == "private" or request.get("private") is True
            repo = self.repos[key] = Repo(repo_id, owner=user, private=private)
            if kind == "space":
                self.space_sdks[repo_id] = request["sdk"]
            self._add_commit(repo, user, "initial commit", "", {".gitattributes": GITATTRIBUTES})
        return {"url": url, "name": repo_id}

    def _validate_yaml(self, **_: Any) -> dict:
        return {"errors": [], "warnings": []}

    def _whoami(self, user: str | None, **_: Any) -> dict:
        if user is None:
            raise _HubError(401, "Invalid credentials in Authorization header")
        return {"type": "user", "id": user, "name": user, "fullname": user, "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "fake", "role": "write"}}}

    def _model_info(self, user: str | None, repo_id: str, rev: str | None = None, **_: Any) -> dict:
        repo = self._readable(repo_id, user)
        commit = self._at(repo, rev)
        return {
            "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.owner, "sha": commit.sha,
            **({"sdk": self.space_sdks[repo.repo_id]} if repo_id.startswith("spaces/") else {}),
            "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
            "createdAt": repo.created_at, "lastModified": commit.date,
            "siblings": [{"rfilename": path, "size": len(data), "blobId": git_blob_sha(data)}
                         for path, data in sorted(commit.files.items())],
        }

    def _tree(self, user: str | None, repo_id: str, rev: str, query: dict[str, list[str]], path: str = "",
              **_: Any) -> list[dict]:
        files = self._at(self._readable(repo_id, user), rev).files
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        entries: dict[str, dict] = {}
        for file_path, data in sorted(files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix):].split("/")
            # Folders are listed too (all of them when recursive, like the Hub); a fake tree id suffices.
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folder = prefix + "/".join(parts[:depth])
                tree_id = hashlib.sha1(folder.encode()).hexdigest()
                entries[folder] = {"type": "directory", "path": folder, "oid": tree_id}
            if recursive or len(parts) == 1:
                entries[file_path] = {"type": "file", "path": file_path, "size": len(data), "oid": git_blob_sha(data)}
        if prefix and not entries:
            raise _HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        return list(entries.values())

    def _refs(self, user: str | None, repo_id: str, **_: Any) -> dict:
        head = self._readable(repo_id, user).commits[-1]
        branch = {"name": BRANCH, "ref": f"refs/heads/{BRANCH}", "targetCommit": head.sha}
        return {"branches": [branch], "converts": [], "tags": [], "pullRequests": []}

    def _commits(self, user: str | None, repo_id: str, rev: str, **_: Any) -> list[dict]:
        repo = self._readable(repo_id, user)
        history = repo.commits[: repo.commits.index(self._at(repo, rev)) + 1]
        return [{"id": c.sha, "title": c.title, "message": c.message, "date": c.date,
                 "authors": [{"user": c.author}]} for c in reversed(history)]

    def _preupload(self, user: str | None, repo_id: str, rev: str, body: bytes, **_: Any) -> dict:
        files = self._writable(repo_id, user, rev).commits[-1].files
        answers = []
        for file in json.loads(body)["files"]:
            answer = {"path": file["path"], "uploadMode": "regular", "shouldIgnore": False}
            if file["path"] in files:  # lets the client skip files that did not change
                answer["oid"] = git_blob_sha(files[file["path"]])
            answers.append(answer)
        return {"files": answers}

    def _commit(self, user: str | None, repo_id: str, rev: str, query: dict[str, list[str]], body: bytes,
                **_: Any) -> dict:
        repo = self._writable(repo_id, user, rev)
        if query.get("create_pr", ["0"])[0] == "1":
            raise _HubError(400, "FakeHub does not support pull requests")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        with self._lock:
            head = repo.commits[-1]
            if header.get("parentCommit") not in (None, head.sha):
                raise _HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)  # files the commit does not mention carry over from the parent
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise _HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    files = {path: data for path, data in files.items() if not path.startswith(folder)}
                elif key != "header":
                    raise _HubError(400, f"FakeHub does not support '{key}' commit operations")
            commit = self._add_commit(repo, user, header["summary"], header.get("description", ""), files)
        url = f"{self.endpoint}/{repo_id}/commit/{commit.sha}"
        return {"success": True, "commitOid": commit.sha, "commitUrl": url, "pullRequestUrl": None, "hookOutput": ""}

    def _resolve(self, user: str | None, repo_id: str, rev: str, path: str,
                 **_: Any) -> tuple[int, dict[str, str], bytes]:
        commit = self._at(self._readable(repo_id, user), rev)
        if path not in commit.files:
            # The client caches the absence per commit, hence the commit header on the 404 too.
            raise _HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit.sha})
        data = commit.files[path]
        # No `X-Xet-Hash`/`X-Xet-Refresh-Route`: their absence makes the client download over plain HTTP.
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{git_blob_sha(data)}"',
                   "Content-Type": "application/octet-stream"}
        return 200, headers, data


# -- pointing huggingface_hub at a FakeHub

_PACKAGES = ("huggingface_hub", "transformers", "timm", "datasets")  # may hold copies of hub constants
_UNSET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN", "HUGGINGFACE_CO_STAGING",
              "HUGGINGFACE_HUB_CACHE", "HUGGINGFACE_ASSETS_CACHE")


def _rebind(old: dict[str, Any], new: dict[str, Any]) -> None:
    """In every loaded module of `_PACKAGES`, set each named global that still holds its `old` value to `new`.

    This reaches `huggingface_hub.constants` and every `from ..constants import ENDPOINT`-style copy (e.g.
    `huggingface_hub.cli.auth`, `datasets.config.HF_ENDPOINT`), including those imported while patched.
    """
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in _PACKAGES and module is not None:
            namespace = vars(module)
            for key, value in new.items():
                if key in namespace and namespace[key] == old[key]:
                    namespace[key] = value


class NetworkAccessError(RuntimeError):
    """Raised by `loopback_only` for a connection or DNS lookup outside 127.0.0.1."""


_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Make Python-level connections and DNS lookups of any non-loopback host raise `NetworkAccessError`,
    so a test that would reach huggingface.co fails at once instead of hanging or silently using the cache."""
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def check(host: Any) -> None:
        if host not in _LOOPBACK:
            raise NetworkAccessError(f"tests may only reach the loopback interface, not {host!r}")

    def connect(sock: socket.socket, address: Any) -> None:
        if isinstance(address, tuple):  # not an AF_UNIX path
            check(address[0])
        real_connect(sock, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        check(host.decode() if isinstance(host, bytes) else host)
        return real_getaddrinfo(host, *args, **kwargs)

    with mock.patch.object(socket.socket, "connect", connect), mock.patch.object(socket, "getaddrinfo", getaddrinfo):
        yield


@contextlib.contextmanager
def use_hub(hub: FakeHub, cache_dir: str | os.PathLike[str]) -> Iterator[FakeHub]:
    """Point `huggingface_hub` at `hub` with `cache_dir` as HF home, restoring everything on exit.

    Patches the hub constants (endpoint, URL template, cache and token paths, telemetry and offline flags)
    and their copies in loaded modules, the module-level `huggingface_hub.hf_api.api`, and the environment
    (for subprocesses and later imports). Machine tokens are out of reach (token env vars unset, token
    files looked up under `cache_dir`), so only tokens passed explicitly, or set as `HF_TOKEN` inside the
    block, authenticate. `HfApi` objects created before entering keep their own endpoint.
    """
    home = Path(cache_dir)
    settings: dict[str, Any] = {
        "ENDPOINT": hub.endpoint,
        "HF_ENDPOINT": hub.endpoint,  # the name of the endpoint copy in `datasets.config`
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_OFFLINE": False,  # the fake hub is the network
    }
    originals = {key: getattr(constants, "ENDPOINT" if key == "HF_ENDPOINT" else key) for key in settings}
    env_keys = ("HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HF_ASSETS_CACHE", "HF_XET_CACHE", "HF_TOKEN_PATH")
    env = {key: settings[key] for key in env_keys} | {"HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"}
    # A proxy from the environment must not carry the loopback traffic elsewhere.
    no_proxy = ",".join(filter(None, [os.environ.get("no_proxy") or os.environ.get("NO_PROXY"), "127.0.0.1"]))
    env |= {"no_proxy": no_proxy, "NO_PROXY": no_proxy}
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, env))  # restores the whole environment, unset keys too
        for key in _UNSET_ENV:
            os.environ.pop(key, None)
        stack.enter_context(mock.patch.object(hf_api.api, "endpoint", hub.endpoint))
        _rebind(originals, settings)
        stack.callback(_rebind, settings, originals)
        close_session()  # the shared HTTP client reads proxy settings when created
        stack.callback(close_session)
        yield hub


@pytest.fixture
def fake_hub(tmp_path: Path) -> Iterator[FakeHub]:
    """A running `FakeHub` that `huggingface_hub` talks to, with HF home in `tmp_path / "hf_home"`,
    and with any non-loopback connection raising `NetworkAccessError`."""
    with FakeHub() as hub, use_hub(hub, tmp_path / "hf_home"), loopback_only():
        yield hub
