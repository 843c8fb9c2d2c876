"""A small real Hugging Face Hub (and ModelScope) on 127.0.0.1, for tests: the documented API, faults included.

What it speaks (what huggingface_hub and ``fetch hf://`` call):

* ``GET /api/models/{repo}/revision/{rev}``: model info with ``sha`` and ``siblings``;
* ``GET /api/models/{repo}/tree/{rev}?recursive=…``: the file list (``oid`` = git blob id,
  ``lfs.oid`` = SHA-256 for LFS files), paged with ``Link: <…>; rel="next"`` when
  ``tree_page_size`` is set;
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: small files directly (``ETag`` = git blob id,
  ``X-Repo-Commit``), LFS files as ``302`` to a CDN with ``X-Linked-Etag``/``X-Linked-Size``;
  the CDN is another :class:`FaultServer` reached as ``localhost`` (another host), or this
  server's ``/cdn/`` with a relative ``Location`` (``relative_cdn``);
* private repositories: ``401`` without ``Authorization: Bearer <token>``; ``404`` with
  ``X-Error-Code`` ``RepoNotFound``/``RevisionNotFound``/``EntryNotFound``;
* ModelScope: ``GET /api/v1/models/{repo}/repo/files?Revision=…&Recursive=true`` and
  ``GET /api/v1/models/{repo}/repo?Revision=…&FilePath=…``.

Faults (:class:`~tests.fetch.faultserver.Fault`) apply to every request, API included.
Its fidelity is checked in tests/hub by the real huggingface_hub downloading from it.
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tests.fetch.faultserver import FaultServer

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".h5", ".onnx")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\nsize {len(data)}\n".encode()


@dataclass
class RepoFileInfo:
    path: str
    size: int
    sha256: str
    lfs: bool
    blob_id: str  # the git blob id (of the LFS pointer for LFS files)


@dataclass
class HubRepo:
    repo_id: str
    commits: dict[str, dict[str, RepoFileInfo]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    token: str | None = None  # set: private, this token reads it
    override: dict[str, str] = field(default_factory=dict)  # path -> sha256 to *claim* (a lying endpoint)


class HubServer(FaultServer):
    def __init__(self, root: Path, *, cdn: FaultServer | None = None, relative_cdn: bool = False) -> None:
        super().__init__(root)
        self.repos: dict[str, HubRepo] = {}
        self.cdn = cdn
        self.relative_cdn = relative_cdn
        self.tree_page_size = 0
        self.lfs_threshold = 10 * 1024
        #: >0: CDN URLs are signed (``?sig=N``) and each signature is refused (403) after this many uses,
        #: as the Hub's signed CDN URLs expire. Only for this server as its own CDN.
        self.sig_uses = 0
        self._sigs: dict[str, int] = {}
        self._next_sig = 0

    # -- content -----------------------------------------------------------
    def add_commit(self, repo_id: str, files: dict[str, bytes], *, refs: tuple[str, ...] = ("main",), token: str | None = None) -> str:
        """Add a commit with these files; point ``refs`` at it. Returns the commit id."""
        repo = self.repos.setdefault(repo_id, HubRepo(repo_id))
        if token is not None:
            repo.token = token
        infos: dict[str, RepoFileInfo] = {}
        objects = self.root / "objects"
        objects.mkdir(parents=True, exist_ok=True)
        for path, data in sorted(files.items()):
            sha = hashlib.sha256(data).hexdigest()
            lfs = path.endswith(LFS_SUFFIXES) or len(data) >= self.lfs_threshold
            blob = git_blob_id(lfs_pointer(data)) if lfs else git_blob_id(data)
            (objects / sha).write_bytes(data)
            if not lfs:
                (objects / blob).write_bytes(data)
            infos[path] = RepoFileInfo(path, len(data), sha, lfs, blob)
        listing = json.dumps(sorted((p, i.blob_id) for p, i in infos.items())).encode()
        commit = hashlib.sha1(repo_id.encode() + b"\0" + listing + str(len(repo.commits)).encode()).hexdigest()
        repo.commits[commit] = infos
        for r in refs:
            repo.refs[r] = commit
        return commit

    def _cdn_base(self) -> str:
        if self.cdn is not None:
            return f"http://localhost:{self.cdn.port}"
        return f"http://127.0.0.1:{self.port}"

    # -- answers -----------------------------------------------------------
    async def _json(self, stream: trio.SocketStream, status: str, value: object, extra: str = "") -> bool:
        await self._send_simple(stream, status, extra, json.dumps(value).encode(), "application/json")
        return True

    async def _error(self, stream: trio.SocketStream, status: str, code: str, extra: str = "", head: bool = False) -> bool:
        if head:  # a HEAD answer has no body
            await self._send_simple(stream, status, f"X-Error-Code: {code}\r\n{extra}", b"", "application/json")
            return True
        return await self._json(stream, status, {"error": code}, f"X-Error-Code: {code}\r\n{extra}")

    async def _fault(self, stream: trio.SocketStream, rel: str, has_range: bool, reused: bool) -> bool | None:
        """Apply a fault rule to an API or redirect answer; None when no fault applies."""
        fault = self._fault_for(rel, has_range, reused)
        if fault is None:
            return None
        if fault.kind == "drop":
            return False
        if fault.kind == "html":
            await self._send_simple(stream, "200 OK", body=b"<!doctype html><html><body>Captive portal</body></html>", ctype="text/html")
            return True
        if fault.kind in ("429", "503"):
            await self._send_simple(stream, f"{fault.kind} Busy", f"Retry-After: {fault.retry_after}\r\n", b"busy")
            return True
        if fault.kind in ("502", "504", "404"):
            await self._send_simple(stream, f"{fault.kind} Fault", body=b"fault")
            return True
        if fault.kind == "reset":
            return False
        self.faults.insert(0, fault)  # a body fault: leave it to the file answer
        fault.count += 1
        return None

    def _lookup(self, repo_id: str, rev: str, headers: dict[str, str]) -> tuple[str, HubRepo | None, str | None]:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.token is not None and headers.get("authorization") != f"Bearer {repo.token}"):
            return "401 Unauthorized", None, None
        commit = repo.refs.get(rev) or (rev if rev in repo.commits else None)
        if commit is None:
            return "404 Not Found", repo, None
        return "", repo, commit

    async def _respond(self, stream: trio.SocketStream, method: str, target: str, headers: dict[str, str], reused: bool = False) -> bool:
        raw_path, _, query = target.partition("?")
        path = urllib.parse.unquote(raw_path)
        params = dict(urllib.parse.parse_qsl(query))
        if path.startswith("/api/"):
            self.stats.requests += 1
            self.stats.headers.append(headers)
            f = await self._fault(stream, path.lstrip("/"), False, reused)
            if f is not None:
                return f
            return await self._api(stream, path, params, headers)
        if path.startswith("/cdn/objects/"):  # this server as its own CDN
            if self.sig_uses:
                sig = params.get("sig", "")
                if sig not in self._sigs or self._sigs[sig] >= self.sig_uses:
                    self.stats.log.append((path, 403, headers.get("range")))
                    await self._send_simple(stream, "403 Forbidden", body=b"Request has expired")
                    return True
                self._sigs[sig] += 1
            return await super()._respond(stream, method, path[len("/cdn"):], headers, reused)
        m = _RESOLVE.match(path)
        if m is None:
            return await super()._respond(stream, method, target, headers, reused)
        self.stats.headers.append(headers)
        why, repo, commit = self._lookup(m["repo"], m["rev"], headers)
        if repo is None:
            self.stats.requests += 1
            return await self._error(stream, why, "RepoNotFound", head=method == "HEAD")
        if commit is None:
            self.stats.requests += 1
            return await self._error(stream, why, "RevisionNotFound", head=method == "HEAD")
        info = repo.commits[commit].get(m["file"])
        if info is None:
            self.stats.requests += 1
            return await self._error(stream, "404 Not Found", "EntryNotFound", f"X-Repo-Commit: {commit}\r\n", head=method == "HEAD")
        if not info.lfs:
            return await super()._respond(stream, method, f"/objects/{info.blob_id}?commit={commit}", headers, reused)
        self.stats.requests += 1
        f = await self._fault(stream, m["file"], "range" in headers, reused)
        if f is not None:
            return f
        loc = f"/cdn/objects/{info.sha256}" if self.relative_cdn else f"{self._cdn_base()}/{'objects' if self.cdn else 'cdn/objects'}/{info.sha256}"
        if self.sig_uses:
            self._next_sig += 1
            self._sigs[str(self._next_sig)] = 0
            loc += f"?sig={self._next_sig}"
        extra = (f"Location: {loc}\r\nX-Repo-Commit: {commit}\r\nX-Linked-Etag: \"{info.sha256}\"\r\n"
                 f"X-Linked-Size: {info.size}\r\nETag: \"{info.blob_id}\"\r\n")
        self.stats.log.append((m["file"], 302, headers.get("range")))
        await self._send_simple(stream, "302 Found", extra)
        return True

    def _etag(self, rel: str, body: bytes) -> str:
        name = rel.rsplit("/", 1)[-1]
        return f'"{name}"' if rel.startswith(("objects/", "cdn/objects/")) else super()._etag(rel, body)

    def _extra_headers(self, target: str, rel: str) -> str:
        commit = dict(urllib.parse.parse_qsl(target.partition("?")[2])).get("commit")
        return f"X-Repo-Commit: {commit}\r\n" if commit else ""

    def _served_as(self, repo: HubRepo, info: RepoFileInfo) -> tuple[str | None, str]:
        """(claimed sha256, blob id) as this endpoint tells them (``override`` makes it lie)."""
        return repo.override.get(info.path, info.sha256) if info.lfs else None, info.blob_id

    async def _api(self, stream: trio.SocketStream, path: str, params: dict[str, str], headers: dict[str, str]) -> bool:
        parts = path.split("/")
        # /api/models/{org}/{name}/revision/{rev} | /api/models/{org}/{name}/tree/{rev}
        if len(parts) >= 7 and parts[2] == "models" and parts[5] in ("revision", "tree"):
            repo_id = f"{parts[3]}/{parts[4]}"
            rev = urllib.parse.unquote("/".join(parts[6:]))
            why, repo, commit = self._lookup(repo_id, rev, headers)
            if repo is None:
                return await self._error(stream, why, "RepoNotFound")
            if commit is None:
                return await self._error(stream, why, "RevisionNotFound")
            files = repo.commits[commit]
            if parts[5] == "revision":
                return await self._json(stream, "200 OK", {
                    "_id": commit[:24], "id": repo_id, "modelId": repo_id, "sha": commit, "private": repo.token is not None,
                    "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [], "library_name": "transformers",
                    "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
                    "siblings": [{"rfilename": p} for p in sorted(files)],
                })
            return await self._tree(stream, repo, files, path, params)
        # ModelScope: /api/v1/models/{org}/{name}/repo/files | /api/v1/models/{org}/{name}/repo
        if len(parts) >= 7 and parts[2] == "v1" and parts[3] == "models" and parts[6] == "repo":
            repo_id = f"{parts[4]}/{parts[5]}"
            why, repo, commit = self._lookup(repo_id, params.get("Revision", "master"), headers)
            if repo is None or commit is None:
                return await self._json(stream, "200 OK" if repo else why, {"Code": 10010205001, "Message": "not found", "Success": False})
            files = repo.commits[commit]
            if len(parts) == 8 and parts[7] == "files":
                out = [{"Name": p.rsplit("/", 1)[-1], "Path": p, "Type": "blob", "Size": i.size, "Sha256": repo.override.get(p, i.sha256),
                        "Revision": commit, "IsLFS": i.lfs} for p, i in sorted(files.items())]
                return await self._json(stream, "200 OK", {"Code": 200, "Data": {"Files": out}, "Success": True})
            info = files.get(params.get("FilePath", ""))
            if info is None:
                return await self._error(stream, "404 Not Found", "EntryNotFound")
            return await super()._respond(stream, "GET", f"/objects/{info.sha256}", headers)
        return await self._error(stream, "404 Not Found", "NotFound")

    async def _tree(self, stream: trio.SocketStream, repo: HubRepo, files: dict[str, RepoFileInfo], path: str, params: dict[str, str]) -> bool:
        entries: list[dict[str, object]] = []
        dirs: set[str] = set()
        for p, info in sorted(files.items()):
            segs = p.split("/")
            for k in range(1, len(segs)):
                d = "/".join(segs[:k])
                if d not in dirs:
                    dirs.add(d)
                    entries.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d})
            sha, blob = self._served_as(repo, info)
            e: dict[str, object] = {"type": "file", "oid": blob, "size": info.size, "path": p}
            if sha is not None:
                e["lfs"] = {"oid": sha, "size": info.size, "pointerSize": len(lfs_pointer(b"x" * info.size))}
            entries.append(e)
        if params.get("recursive", "false").lower() != "true":
            entries = [e for e in entries if "/" not in str(e["path"])]
        start = int(params.get("cursor", "0"))
        extra = ""
        if self.tree_page_size:
            end = start + self.tree_page_size
            if end < len(entries):
                q = urllib.parse.urlencode({**params, "cursor": str(end)})
                extra = f"Link: <http://127.0.0.1:{self.port}{urllib.parse.quote(path)}?{q}>; rel=\"next\"\r\n"
            entries = entries[start:end]
        return await self._json(stream, "200 OK", entries, extra)
