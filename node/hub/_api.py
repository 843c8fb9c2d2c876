"""The Hub's HTTP API, as a client: references, endpoints, tokens, revision and file list.

Theory of operation
-------------------
A reference ``hf://ORG/REPO[@REV]`` (or ``ms://`` for ModelScope) names a
repository and a revision (branch, tag or commit; default ``main``, or
``master`` on ModelScope). Every endpoint given (``HF_ENDPOINT`` or the
public Hub, plus each ``--endpoint``) is asked, once, for:

1. the commit the revision points at (``/api/models/{repo}/revision/{rev}``);
2. the file list at that commit (``/api/models/{repo}/tree/{commit}?recursive=true``,
   following ``Link: rel="next"`` pages): each file's size, git blob id and,
   for LFS files, SHA-256.

The answers must agree (commit, paths, sizes, hashes); any disagreement is a
refusal naming the endpoints, because the endpoints are then treated as
mirrors of one commit whose bytes are checked against these identities. An
endpoint that cannot be reached or answers something that is not the API
(an HTML page, a captive portal) is dropped with a warning, unless it is the
only one.

Tokens: ``--token-file``, else ``HF_TOKEN``, else huggingface_hub's stored
token (``HF_TOKEN_PATH`` or ``HF_HOME/token``). A token goes in the
``Authorization`` header to the endpoints only: never logged, never in a
manifest, never to peers, and dropped on redirects to another origin.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from autoglm.node._http import PermanentMirrorError, get_small
from autoglm.node._mirrors import USER_AGENT, parse_retry_after
from autoglm.node.errors import ConfigError, IntegrityError, MirrorError, SourceError

__all__ = [
    "HF_DEFAULT_ENDPOINT",
    "MS_DEFAULT_ENDPOINT",
    "HubAccessError",
    "HubFile",
    "HubRef",
    "RepoSnapshot",
    "default_endpoints",
    "file_url",
    "load_token",
    "parse_ref",
    "resolve_snapshot",
]

HF_DEFAULT_ENDPOINT = "https://huggingface.co"
MS_DEFAULT_ENDPOINT = "https://www.modelscope.cn"
API_LIMIT = 64 << 20  # bytes of one API answer (a tree page of a huge repo stays well under)
API_TIMEOUT = 60.0
API_TRIES = 6
MAX_PAGES = 1000
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_HEX = re.compile(r"^[0-9a-f]+$")
_LINK_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


class HubAccessError(MirrorError):
    """The Hub refused us (401/403) or does not know the repository or revision (404).

    ``status`` and ``code`` (the ``X-Error-Code``) are the endpoint's answer, which the
    gateway passes on to its clients.
    """

    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class HubRef:
    """``hf://ORG/REPO@REV``: which hub, which repository, which revision."""

    hub: str  # "hf" or "ms"
    repo: str
    revision: str

    def __str__(self) -> str:
        return f"{self.hub}://{self.repo}@{self.revision}"


@dataclass(frozen=True, slots=True)
class HubFile:
    """One file of a repository at a commit, with the identity the Hub gives it."""

    path: str
    size: int
    blob_id: str | None  # git blob sha1 (hex); None on ModelScope
    sha256: str | None  # LFS SHA-256 (hex); on ModelScope every file has one
    xet_hash: str | None = None

    @property
    def lfs(self) -> bool:
        return self.sha256 is not None and self.blob_id is not None

    @property
    def etag(self) -> str:
        """The blob name huggingface_hub uses in its cache: SHA-256 for LFS files, else the git blob id."""
        if self.sha256 is not None:
            return self.sha256
        assert self.blob_id is not None
        return self.blob_id


@dataclass(frozen=True, slots=True)
class RepoSnapshot:
    """A repository pinned to one commit, as every endpoint agreed on it."""

    ref: HubRef
    commit: str
    files: tuple[HubFile, ...]
    endpoints: tuple[str, ...]
    dropped: tuple[str, ...] = field(default=())  # endpoints left out, with why


def parse_ref(text: str, revision: str | None = None) -> HubRef:
    """``hf://ORG/REPO[@REV]`` or ``ms://ORG/REPO[@REV]``; ``revision`` (``--revision``) overrides ``@REV``."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("hf", "ms"):
        raise ConfigError(f"not a hub reference: {text!r} (use hf://ORG/REPO[@REV] or ms://ORG/REPO[@REV])")
    repo, at, rev = rest.partition("@")
    repo = repo.strip("/")
    if repo.startswith("models/"):
        repo = repo[len("models/") :]
    if not _REPO.match(repo) or ".." in repo:
        raise ConfigError(f"not a repository id: {repo!r} (expected ORG/REPO)")
    if at and not rev:
        raise ConfigError(f"{text!r}: empty revision after '@'")
    rev = revision or rev or ("master" if scheme == "ms" else "main")
    if len(rev) > 256 or any(c in rev for c in "\x00\r\n") or ".." in rev.split("/"):
        raise ConfigError(f"not a revision: {rev!r}")
    return HubRef(scheme, repo, rev)


def default_endpoints(hub: str, extra: Sequence[str]) -> list[str]:
    """``HF_ENDPOINT`` (or ``MODELSCOPE_DOMAIN``) or the public hub, then each ``--endpoint`` once."""
    if hub == "hf":
        first = os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT
    else:
        dom = os.environ.get("MODELSCOPE_DOMAIN")
        first = (dom if "://" in dom else "https://" + dom) if dom else MS_DEFAULT_ENDPOINT
    out: list[str] = []
    for e in (first, *extra):
        e = e.rstrip("/")
        u = urllib.parse.urlsplit(e)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ConfigError(f"not an endpoint URL: {e!r}")
        if e not in out:
            out.append(e)
    return out


def load_token(token_file: Path | None) -> str | None:
    """The token: ``--token-file``, ``HF_TOKEN``, or huggingface_hub's stored token. Never logged."""
    if token_file is not None:
        try:
            tok = token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --token-file {token_file}: {exc.strerror}") from exc
        if not tok:
            raise ConfigError(f"--token-file {token_file} is empty")
        return tok
    env = os.environ.get("HF_TOKEN", "").strip()
    if env:
        return env
    stored = os.environ.get("HF_TOKEN_PATH") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"),
        "token",
    )
    try:
        tok = Path(stored).read_text().strip()
    except OSError:
        return None
    return tok or None


def _quote(path: str) -> str:
    return "/".join(urllib.parse.quote(seg, safe="") for seg in path.split("/"))


def file_url(endpoint: str, ref: HubRef, commit: str, path: str) -> str:
    """Where a file's bytes are, pinned to the commit."""
    if ref.hub == "ms":
        q = urllib.parse.urlencode({"Revision": commit, "FilePath": path})
        return f"{endpoint}/api/v1/models/{ref.repo}/repo?{q}"
    return f"{endpoint}/{ref.repo}/resolve/{commit}/{_quote(path)}"


class _Api:
    """One endpoint's API, with retries for 429/5xx (Retry-After honoured) and clear refusals."""

    def __init__(self, endpoint: str, token: str | None) -> None:
        self.endpoint = endpoint
        self._headers = {"User-Agent": USER_AGENT, "Accept": "application/json", "Accept-Encoding": "identity"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._rng = random.Random()

    async def get_json(self, url: str, what: str) -> tuple[Any, dict[str, str]]:
        delay = 0.5
        for attempt in range(API_TRIES):
            try:
                resp, body, _ = await get_small(url, dict(self._headers), limit=API_LIMIT, time_limit=API_TIMEOUT)
            except MirrorError as exc:
                if attempt == API_TRIES - 1 or isinstance(exc, PermanentMirrorError):
                    raise  # unknown host, refused certificate, https->http: retrying will not help
                await trio.sleep(delay * self._rng.uniform(0.5, 1.5))
                delay *= 2
                continue
            st = resp.status
            if st in (429, 500, 502, 503, 504):
                if attempt == API_TRIES - 1:
                    raise MirrorError(f"{url}: HTTP {st} {resp.reason} after {API_TRIES} tries")
                ra = parse_retry_after(resp.headers.get("retry-after"), time.time())
                await trio.sleep(min(max(ra or 0.0, delay * self._rng.uniform(0.5, 1.5)), 60.0))
                delay *= 2
                continue
            if st in (401, 403):
                code = resp.headers.get("x-error-code", "")
                hint = "the repository is gated: accept its terms on the Hub, then use a token" if code == "GatedRepo" or st == 403 else (
                    "the repository is private or does not exist: give a token (HF_TOKEN, --token-file or `hf auth login`)")
                raise HubAccessError(f"{self.endpoint}: {what}: {st} {resp.reason}: {hint}", st, code)
            if st == 404:
                code = resp.headers.get("x-error-code", "")
                raise HubAccessError(f"{self.endpoint}: {what}: not found ({code or '404'}): check the repository id and revision", st, code)
            if st != 200:
                raise MirrorError(f"{url}: HTTP {st} {resp.reason}")
            ctype = resp.headers.get("content-type", "").lower()
            if "html" in ctype or body.lstrip()[:1] == b"<":
                raise MirrorError(f"{self.endpoint} answered an HTML page to {what}, not the Hub API; is it a Hub endpoint?")
            try:
                return json.loads(body), resp.headers
            except ValueError as exc:
                raise MirrorError(f"{self.endpoint}: {what}: the answer is not JSON") from exc
        raise AssertionError("unreachable")


def _fail(endpoint: str, what: str) -> MirrorError:
    return MirrorError(f"{endpoint}: malformed API answer: {what}")


async def _hf_snapshot(api: _Api, ref: HubRef) -> tuple[str, list[HubFile]]:
    ep = api.endpoint
    info, _ = await api.get_json(f"{ep}/api/models/{ref.repo}/revision/{urllib.parse.quote(ref.revision, safe='')}", f"revision {ref.revision} of {ref.repo}")
    commit = info.get("sha") if isinstance(info, dict) else None
    if not isinstance(commit, str) or not _COMMIT.match(commit):
        raise _fail(ep, "no commit sha for the revision")
    files: list[HubFile] = []
    url: str | None = f"{ep}/api/models/{ref.repo}/tree/{commit}?recursive=true&expand=false"
    for _ in range(MAX_PAGES):
        if url is None:
            break
        page, headers = await api.get_json(url, f"the file list of {ref.repo}@{commit[:12]}")
        if not isinstance(page, list):
            raise _fail(ep, "the file list is not a list")
        for entry in page:
            f = _hf_file(ep, entry)
            if f is not None:
                files.append(f)
        m = _LINK_NEXT.search(headers.get("link", ""))
        url = urllib.parse.urljoin(url, m.group(1)) if m else None
    else:
        raise _fail(ep, f"more than {MAX_PAGES} pages of files")
    return commit, files


def _hf_file(ep: str, entry: Any) -> HubFile | None:
    if not isinstance(entry, dict) or entry.get("type") not in ("file", "directory"):
        raise _fail(ep, "a file list entry")
    if entry["type"] != "file":
        return None
    path, size, oid = entry.get("path"), entry.get("size"), entry.get("oid")
    if not isinstance(path, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _fail(ep, f"file entry {str(path)[:80]!r}")
    if not isinstance(oid, str) or len(oid) != 40 or not _HEX.match(oid):
        raise _fail(ep, f"git blob id of {path!r}")
    sha = None
    lfs = entry.get("lfs")
    if lfs is not None:
        sha = lfs.get("oid") if isinstance(lfs, dict) else None
        if isinstance(sha, str) and sha.startswith("sha256:"):
            sha = sha[len("sha256:") :]
        if not isinstance(sha, str) or len(sha) != 64 or not _HEX.match(sha) or lfs.get("size", size) != size:
            raise _fail(ep, f"LFS identity of {path!r}")
    xet = entry.get("xetHash")
    return HubFile(path, size, oid, sha, xet if isinstance(xet, str) else None)


async def _ms_snapshot(api: _Api, ref: HubRef) -> tuple[str, list[HubFile]]:
    ep = api.endpoint
    q = urllib.parse.urlencode({"Revision": ref.revision, "Recursive": "true"})
    ans, _ = await api.get_json(f"{ep}/api/v1/models/{ref.repo}/repo/files?{q}", f"the file list of {ref.repo}@{ref.revision}")
    data = ans.get("Data") if isinstance(ans, dict) else None
    if not isinstance(ans, dict) or ans.get("Code", 200) != 200 or not isinstance(data, dict) or not isinstance(data.get("Files"), list):
        msg = ans.get("Message") if isinstance(ans, dict) else None
        raise MirrorError(f"{ep}: ModelScope refused the file list of {ref.repo}@{ref.revision}: {msg or 'malformed answer'}")
    files: list[HubFile] = []
    revs: set[str] = set()
    for e in data["Files"]:
        if not isinstance(e, dict):
            raise _fail(ep, "a file list entry")
        if e.get("Type") == "tree":
            continue
        path, size, sha = e.get("Path"), e.get("Size"), e.get("Sha256")
        if not isinstance(path, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _fail(ep, f"file entry {str(path)[:80]!r}")
        if not isinstance(sha, str) or len(sha) != 64 or not _HEX.match(sha.lower()):
            raise _fail(ep, f"Sha256 of {path!r}")
        rev = e.get("Revision")
        if isinstance(rev, str):
            revs.add(rev)
        files.append(HubFile(path, size, None, sha.lower()))
    # The listing names a commit per file; when they all agree it pins the snapshot, else the
    # revision name stands (every file is still checked against its SHA-256).
    commit = revs.pop() if len(revs) == 1 else ""
    return commit if _COMMIT.match(commit) else ref.revision, files


def _check_paths(ep: str, files: list[HubFile]) -> None:
    from autoglm.protocol._paths import check_path

    seen: set[str] = set()
    for f in files:
        try:
            check_path(f.path)
        except Exception as exc:  # RemoteProtocolError: a path that could escape the folder
            raise MirrorError(f"{ep}: refused file path {f.path!r}: {exc}") from exc
        if f.path in seen:
            raise _fail(ep, f"{f.path!r} listed twice")
        seen.add(f.path)


async def resolve_snapshot(ref: HubRef, endpoints: Sequence[str], token: str | None) -> RepoSnapshot:
    """Ask every endpoint for the commit and file list; they must agree. Raises IntegrityError if not."""
    answers: dict[str, tuple[str, list[HubFile]]] = {}
    errors: dict[str, Exception] = {}

    async def ask(ep: str) -> None:
        api = _Api(ep, token)
        try:
            commit, files = await (_ms_snapshot(api, ref) if ref.hub == "ms" else _hf_snapshot(api, ref))
            _check_paths(ep, files)
            answers[ep] = (commit, files)
        except SourceError as exc:
            errors[ep] = exc

    async with trio.open_nursery() as nursery:
        for ep in endpoints:
            nursery.start_soon(ask, ep)
    if not answers:
        access = [e for e in errors.values() if isinstance(e, HubAccessError)]
        first = access[0] if access else next(iter(errors.values()))
        if isinstance(first, HubAccessError) or len(errors) == 1:
            raise first
        raise SourceError("no endpoint answered: " + "; ".join(str(e) for e in errors.values()))
    if any(isinstance(e, HubAccessError) for e in errors.values()):
        # One endpoint says the repository or revision is not there while another serves it: not mirrors of one commit.
        raise IntegrityError("the endpoints disagree: " + "; ".join(str(e) for e in errors.values() if isinstance(e, HubAccessError)))
    order = [ep for ep in endpoints if ep in answers]
    ref_ep = order[0]
    commit, files = answers[ref_ep]
    want = {f.path: f for f in files}
    for ep in order[1:]:
        c, fs = answers[ep]
        if c != commit:
            raise IntegrityError(f"the endpoints disagree on {ref}: {ref_ep} says commit {commit}, {ep} says {c}; refusing")
        got = {f.path: f for f in fs}
        if set(got) != set(want):
            diff = sorted(set(got) ^ set(want))[:3]
            raise IntegrityError(f"the endpoints disagree on the files of {ref.repo}@{commit[:12]} ({', '.join(diff)}): {ref_ep} vs {ep}; refusing")
        for p, f in want.items():
            g = got[p]
            if (g.size, g.blob_id, g.sha256) != (f.size, f.blob_id, f.sha256):
                raise IntegrityError(f"the endpoints disagree on {p} of {ref.repo}@{commit[:12]}: {ref_ep} vs {ep}; refusing")
    dropped = tuple(f"{ep}: {exc}" for ep, exc in errors.items())
    return RepoSnapshot(ref, commit, tuple(sorted(files, key=lambda f: f.path)), tuple(order), dropped)
