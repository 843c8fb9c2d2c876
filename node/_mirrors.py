"""HTTP mirrors as a :class:`~autoglm.node._sources.Source`: Range requests, scoring, backoff.

A mirror is a base URL; a file's URL is the base plus its manifest path, each
segment percent-quoted. One :class:`MirrorSource` keeps a small pool of
keep-alive connections and a :class:`MirrorScore`.

Scoring (pure: every method takes ``now``): exponentially weighted RTT (time
to the response head), throughput and error rate. A mirror is *degraded* when
RTT exceeds ``rtt_threshold`` (200 ms) or the error rate exceeds
``error_threshold`` (5 %); both are defaults (``mirrors.rtt_threshold`` and
``mirrors.error_threshold`` in the config file). A degraded mirror gets a single
request at a time while a healthy mirror is ready to take the work (work moves
away, and that single request is the probe that lets it recover). When it is
the only mirror, or every mirror is degraded or backing off, it keeps its full
width and may grow it: a far or lossy origin is slow per connection, and
starving it of connections only makes it slower. Failures set ``ready_at`` by exponential backoff
with jitter; ``Retry-After`` on 429/503 is honoured.

Concurrency adapts per mirror: it starts at ``initial_connections`` and grows
by one after each request whose own throughput stayed under
``per_connection_floor`` (a per-connection rate limit such as nginx
``limit_rate``), up to ``max_connections``; an error halves it.

Faults and what happens:

* 5xx, reset, stall (no progress for ``stall_timeout``), truncated body:
  MirrorError, backoff, the undelivered pieces go back to the picker.
* 404/410, a size that differs from the manifest, an HTML page: the file (or
  the piece) is permanently unavailable from this mirror (:class:`FileNotOnMirror`).
* 200 to a Range request (Range ignored, or the file changed and If-Range
  failed): the whole body is streamed once and every piece still needed is
  claimed and stored as it passes, so the file is not fetched once per piece.
* 3xx: followed (up to 5 hops, relative ``Location`` too); ``Authorization``
  is not sent to another origin. The final URL of each file is remembered
  (the Hub redirects every ``resolve`` to a signed CDN URL) and forgotten when
  it stops working (4xx), so the next request resolves again.
* 401/403: the mirror refuses us this file (a private or gated repo without
  the right token): permanent for that file.
* Bytes that fail the hash: IntegrityError from the sink; the score takes an
  error and the engine never asks this mirror for that piece again.
"""

from __future__ import annotations

import mmap
import random
import time
import urllib.parse
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

import trio

from autoglm.node._http import (
    MAX_REDIRECTS,
    HttpConnection,
    PermanentMirrorError,
    Response,
    Url,
    open_connection,
    parse_url,
    redirect_headers,
    redirect_location,
    request_target,
)
from autoglm.node._sources import FetchRequest, PieceRef, PieceSink, PieceWriter, SourceKind
from autoglm.node._staging import DIRECT_ALIGN
from autoglm.node.errors import IntegrityError, MirrorError

__all__ = ["FileNotOnMirror", "MirrorConfig", "MirrorScore", "MirrorSource", "RetryLater", "file_url"]

USER_AGENT = "autoglm-node/0.1"
RATE_PROBE = 0.25  # seconds into a request before its own rate is judged
FIRST_REQUEST_BYTES = 16 << 20  # request size cap until a connection's rate is known
REQUEST_SECONDS = 2.0  # a request lasts about this long at the measured rate...
REQUEST_RTTS = 40  # ...and at least this many round trips to the response head (10 s at 250 ms)


class FileNotOnMirror(PermanentMirrorError):
    """This mirror cannot serve the file (404, wrong size, HTML): do not ask it again for it."""


class RetryLater(MirrorError):
    """429/503 with an optional Retry-After (seconds)."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class MirrorConfig:
    initial_connections: int = 4
    max_connections: int = 16
    max_request_bytes: int = 64 << 20
    per_connection_floor: float = 64e6  # bytes/s; below this more connections help
    stall_timeout: float = 20.0
    stall_bytes: int = 64 << 10
    connect_timeout: float = 10.0
    rtt_threshold: float = 0.2
    error_threshold: float = 0.05
    backoff_base: float = 0.25
    backoff_cap: float = 30.0
    retry_after_cap: float = 300.0
    recv_buffer: int = 2 << 20


@dataclass(slots=True)
class MirrorScore:
    """Continuous scoring of one mirror. Pure: the caller passes ``now``."""

    config: MirrorConfig = field(default_factory=MirrorConfig)
    rtt: float | None = None
    throughput: float | None = None
    error_rate: float = 0.0
    failures: int = 0
    ready_at: float = 0.0
    connections: int = 0
    requests: int = 0
    errors: int = 0

    def __post_init__(self) -> None:
        if not self.connections:
            self.connections = self.config.initial_connections

    @property
    def degraded(self) -> bool:
        c = self.config
        return (self.rtt is not None and self.rtt > c.rtt_threshold) or self.error_rate > c.error_threshold

    @property
    def value(self) -> float:
        """Higher is better: expected useful bytes per second."""
        tput = self.throughput if self.throughput is not None else 1e9
        rtt = self.rtt if self.rtt is not None else 0.0
        return tput * (1.0 - min(self.error_rate, 0.99)) / (1.0 + rtt)

    def on_response(self, rtt: float) -> None:
        self.rtt = rtt if self.rtt is None else 0.7 * self.rtt + 0.3 * rtt

    def on_success(self, now: float, nbytes: int, seconds: float) -> None:
        self.requests += 1
        self.failures = 0
        self.error_rate *= 0.9
        if seconds > 0 and nbytes > 0:
            rate = nbytes / seconds
            self.throughput = rate if self.throughput is None else 0.7 * self.throughput + 0.3 * rate
            if rate < self.config.per_connection_floor and seconds > 0.05:
                self.connections = min(self.config.max_connections, self.connections + 1)

    def on_slow_connection(self, rate: float, others_healthy: bool = False) -> bool:
        """Mid-request: this connection alone runs under the floor (a per-connection limit).

        Returns True when concurrency grew, so the caller can let the engine add a request.
        A degraded mirror grows too when no healthy one is there to take the work.
        """
        self.throughput = rate if self.throughput is None else 0.7 * self.throughput + 0.3 * rate
        if (rate < self.config.per_connection_floor and self.connections < self.config.max_connections
                and not (self.degraded and others_healthy)):
            # Multiplicative: a rate-limited mirror reaches full width in a few probes.
            self.connections = min(self.config.max_connections, self.connections + max(1, self.connections // 2))
            return True
        return False

    def on_failure(self, now: float, rng: random.Random, retry_after: float | None = None) -> None:
        """Count an error and back off: ``base * 2**failures`` with jitter, or Retry-After."""
        c = self.config
        self.requests += 1
        self.errors += 1
        self.failures += 1
        self.error_rate = 0.9 * self.error_rate + 0.1
        self.connections = max(1, self.connections // 2)
        delay = min(c.backoff_cap, c.backoff_base * 2 ** (self.failures - 1)) * rng.uniform(0.5, 1.5)
        if retry_after is not None:
            delay = max(delay, min(retry_after, c.retry_after_cap))
        self.ready_at = max(self.ready_at, now + delay)

    def allowed_requests(self, others_healthy: bool) -> int:
        return 1 if self.degraded and others_healthy else self.connections


def file_url(base: str, path: str) -> str:
    """base + each path segment percent-quoted; the base gets a trailing slash if missing."""
    if not base.endswith("/"):
        base += "/"
    return base + "/".join(urllib.parse.quote(seg, safe="") for seg in path.split("/"))


def parse_retry_after(value: str | None, now_epoch: float) -> float | None:
    if not value:
        return None
    v = value.strip()
    if v.isdigit():
        return float(v)
    try:
        return max(0.0, parsedate_to_datetime(v).timestamp() - now_epoch)
    except (TypeError, ValueError):
        return None


def _content_range(value: str) -> tuple[int, int, int | None] | None:
    # "bytes 0-99/1234" or "bytes 0-99/*"
    try:
        unit, rest = value.strip().split(" ", 1)
        span, total = rest.split("/", 1)
        a, b = span.split("-", 1)
        return int(a), int(b), None if total.strip() == "*" else int(total)
    except ValueError:
        return None


def _check_head(resp: Response, url: Url, start: int, first: PieceRef, last: PieceRef) -> bool:
    """True when the body is the whole file (200), False for the range (206); else the error to raise."""
    st = resp.status
    if st in (404, 410):
        raise FileNotOnMirror(f"{url}: {st} {resp.reason}: the mirror does not have {first.path}")
    if st in (401, 403):
        raise FileNotOnMirror(f"{url}: {st} {resp.reason}: access refused (a private or gated repository needs a token that may read it)")
    if st in (429, 503):
        ra = parse_retry_after(resp.headers.get("retry-after"), _epoch())
        raise RetryLater(f"{url}: {st} {resp.reason}" + (f" (retry after {ra:.0f}s)" if ra is not None else ""), ra)
    if st not in (200, 206):
        raise MirrorError(f"{url}: HTTP {st} {resp.reason}")
    if resp.headers.get("content-type", "").lower().startswith("text/html") and not first.path.lower().endswith((".html", ".htm")):
        raise FileNotOnMirror(
            f"{url} answered an HTML page, not the file; check that --mirror points at the directory holding the model files")
    if st == 206:
        cr = _content_range(resp.headers.get("content-range", ""))
        end = last.offset + last.length - 1
        if cr is None or cr[0] != start or cr[1] != end:
            raise MirrorError(f"{url}: Content-Range {resp.headers.get('content-range')!r} does not match bytes={start}-{end}")
        if cr[2] is not None and cr[2] != first.file_size:
            raise FileNotOnMirror(f"{url}: the mirror's file has {cr[2]} bytes, the manifest says {first.file_size}")
        if resp.content_length is not None and resp.content_length != end - start + 1:
            raise MirrorError(f"{url}: Content-Length does not match the range")
        return False
    # 200: Range ignored, or If-Range saw a different version of the file.
    if resp.content_length is not None and resp.content_length != first.file_size:
        raise FileNotOnMirror(f"{url}: the mirror's file has {resp.content_length} bytes, the manifest says {first.file_size}")
    return True


class MirrorSource:
    """One HTTP mirror. Implements the Source protocol (see ``node/_sources.py``)."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        config: MirrorConfig | None = None,
        peers: list[MirrorSource] | None = None,
        rng: random.Random | None = None,
        url_for: Callable[[str], str] | None = None,
    ) -> None:
        """``url_for`` maps a manifest path to its URL (default: base URL + quoted path)."""
        parse_url(base_url)
        self._url_for = url_for
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.headers = dict(headers or {})
        self.config = config or MirrorConfig()
        self.score = MirrorScore(self.config)
        self._group = peers if peers is not None else [self]
        if self not in self._group:
            self._group.append(self)
        self._rng = rng or random.Random()
        self._idle: list[HttpConnection] = []
        self._etags: dict[str, str] = {}
        self._missing_files: dict[str, str] = {}  # path -> why
        self._located: dict[str, tuple[Url, bool]] = {}  # path -> (URL after redirects, credentials dropped)
        self.no_range = False
        self.bytes_received = 0
        self.last_error: str | None = None

    # -- Source protocol ---------------------------------------------------
    @property
    def id(self) -> str:
        return f"mirror:{self.base_url}"

    @property
    def kind(self) -> SourceKind:
        return SourceKind.MIRROR

    def availability(self) -> Collection[int] | None:
        return None

    def _others_healthy(self) -> bool:
        """Another mirror of the group is healthy and not backing off: it can take this one's work."""
        now = trio.current_time()
        return any(not m.score.degraded and m.score.ready_at <= now and not m.no_range for m in self._group if m is not self)

    def max_requests(self) -> int:
        return 1 if self.no_range else self.score.allowed_requests(self._others_healthy())

    def max_request_bytes(self) -> int:
        # About two seconds of one connection's measured rate (long enough to amortise the
        # request, short enough that a rate-limited mirror does not end on a long tail), and
        # at least REQUEST_RTTS round trips: on a far origin each request costs an idle RTT and
        # a congestion window restarted after the idle, which a short request never repays.
        tput = self.score.throughput
        if tput is None:
            return min(self.config.max_request_bytes, FIRST_REQUEST_BYTES)
        # A degraded mirror's one request is a probe while a healthy mirror takes the work: keep it short.
        probe = self.score.degraded and self._others_healthy()
        seconds = max(REQUEST_SECONDS, 0.0 if probe else REQUEST_RTTS * (self.score.rtt or 0.0))
        return int(min(self.config.max_request_bytes, max(FIRST_REQUEST_BYTES // 4, seconds * tput)))

    def ready_at(self) -> float:
        return self.score.ready_at

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for c in idle:
            await c.aclose()

    # -- fetching ------------------------------------------------------------
    async def _connection(self, url: Url, reuse: bool = True) -> HttpConnection:
        if reuse:
            # Idle connections to other origins (the Hub and its CDN) stay for their own requests.
            for i in range(len(self._idle) - 1, -1, -1):
                if self._idle[i].url.origin == url.origin:
                    return self._idle.pop(i)
        while len(self._idle) > 2 * self.config.max_connections:
            await self._idle.pop(0).aclose()
        with trio.move_on_after(self.config.connect_timeout) as cs:
            return await open_connection(url)
        assert cs.cancelled_caught
        raise MirrorError(f"{url.origin}: connect timed out after {self.config.connect_timeout:.0f}s")

    async def _request(self, url: Url, headers: dict[str, str]) -> tuple[HttpConnection, Response, float]:
        """Send the request; returns the connection, the response head and the RTT.

        A kept-alive connection the server closed while idle fails before any
        response byte: that is retried once on a fresh connection, without blame.
        """
        reused = any(c.url.origin == url.origin for c in self._idle)
        conn = await self._connection(url)
        for attempt in (0, 1):
            t0 = trio.current_time()
            try:
                with trio.move_on_after(self.config.stall_timeout) as cs:
                    resp = await conn.request("GET", request_target(conn, url), dict(headers))
                if cs.cancelled_caught:
                    raise MirrorError(f"{url}: no response within {self.config.stall_timeout:.0f}s")
                return conn, resp, trio.current_time() - t0
            except MirrorError:
                await conn.aclose()
                if attempt or not reused or conn.head_bytes:
                    raise
                conn = await self._connection(url, reuse=False)
        raise AssertionError("unreachable")

    def _file_url(self, path: str) -> Url:
        return parse_url(self._url_for(path) if self._url_for is not None else file_url(self.base_url, path))

    async def _follow(self, path: str, headers: dict[str, str]) -> tuple[HttpConnection, Response, float, Url]:
        """Request the file, following redirects from its URL (or from where it was last found)."""
        located = self._located.get(path)
        if located is not None:
            url, dropped = located
            hdrs = {k: v for k, v in headers.items() if k.lower() != "authorization"} if dropped else dict(headers)
            conn, resp, rtt = await self._request(url, hdrs)
            if resp.status not in (401, 403, 404, 410) and redirect_location(url, resp) is None:
                return conn, resp, rtt, url
            # The remembered URL expired (signed CDN URLs do): resolve the file again.
            self._located.pop(path, None)
            await self._release(conn, resp)
        start = url = self._file_url(path)
        hdrs = dict(headers)
        for _ in range(MAX_REDIRECTS + 1):
            conn, resp, rtt = await self._request(url, hdrs)
            target = redirect_location(url, resp)
            if target is None:
                if url != start:
                    self._located[path] = (url, "authorization" not in {k.lower() for k in hdrs})
                return conn, resp, rtt, url
            await self._release(conn, resp)
            hdrs = redirect_headers(hdrs, url, target)
            url = target
        raise MirrorError(f"{start}: more than {MAX_REDIRECTS} redirects")

    async def _release(self, conn: HttpConnection, resp: Response) -> None:
        """Done with a response we will not use: keep the connection if its body is small, else close it."""
        if conn.reusable and resp.content_length is not None and resp.content_length <= 64 << 10:
            try:
                await conn.read_all(64 << 10)
            except MirrorError:
                await conn.aclose()
                return
            if conn.reusable and conn.remaining == 0:
                self._idle.append(conn)
                return
        await conn.aclose()

    async def fetch(self, request: FetchRequest, sink: PieceSink) -> None:
        first, last = request.pieces[0], request.pieces[-1]
        if first.path in self._missing_files:
            raise FileNotOnMirror(self._missing_files[first.path])
        t0 = trio.current_time()
        conn: HttpConnection | None = None
        try:
            headers = {
                "User-Agent": USER_AGENT,
                "Accept-Encoding": "identity",
                "Range": f"bytes={first.offset + request.skip}-{last.offset + last.length - 1}",
                **self.headers,
            }
            etag = self._etags.get(first.path)
            if etag:
                headers["If-Range"] = etag
            conn, resp, rtt, url = await self._follow(first.path, headers)
            self.score.on_response(rtt)
            whole_file = self._check_response(resp, url, first.offset + request.skip, first, last, sent_if_range=bool(etag))
            nbytes = await self._stream(conn, whole_file, request, sink)
            if conn.reusable and conn.remaining == 0:
                self._idle.append(conn)
                conn = None
            self.score.on_success(trio.current_time(), nbytes, trio.current_time() - t0)
        except RetryLater as exc:
            self.last_error = str(exc)
            self.score.on_failure(trio.current_time(), self._rng, exc.retry_after)
            raise
        except PermanentMirrorError as exc:
            self.last_error = str(exc)
            raise
        except (MirrorError, IntegrityError) as exc:
            self.last_error = str(exc)
            self.score.on_failure(trio.current_time(), self._rng)
            raise
        finally:
            if conn is not None:
                await conn.aclose()

    def _check_response(
        self, resp: Response, url: Url, start: int, first: PieceRef, last: PieceRef, *, sent_if_range: bool
    ) -> bool:
        """Validate the head (:func:`_check_head`) and keep what it says about the file: ETag, Range support."""
        try:
            whole = _check_head(resp, url, start, first, last)
        except FileNotOnMirror as exc:
            self._missing_files[first.path] = str(exc)
            raise
        etag = resp.headers.get("etag")
        if whole and first.path in self._etags and etag != self._etags[first.path]:
            self.last_error = f"{url}: the file changed on the mirror (ETag {self._etags[first.path]} -> {etag}); pieces are checked by hash"
        if etag and not etag.startswith("W/"):
            self._etags[first.path] = etag
        if whole and not sent_if_range:
            self.no_range = True
        return whole

    async def _stream(self, conn: HttpConnection, whole_file: bool, request: FetchRequest, sink: PieceSink) -> int:
        """Read the body from file offset ``pos``, handing whole pieces to the sink.

        A 206 body covers exactly the requested run. A 200 body is the whole
        file: every piece it passes is claimed if still needed, so a mirror that
        ignores Range costs one pass over the file, not one per piece.
        """
        skip = 0 if whole_file else request.skip
        pos = 0 if whole_file else request.pieces[0].offset + skip
        pieces = sink.file_pieces(request.pieces[0].path) if whole_file else request.pieces
        requested = {p.index for p in request.pieces}
        requested_end = request.pieces[-1].offset + request.pieces[-1].length
        # The buffer sits DIRECT_ALIGN bytes bigger than a read, and each read
        # starts at the file position's offset within a block: the store then
        # writes the block-aligned middle straight from it with O_DIRECT, no copy
        # (node/_staging.py, DIRECT_IO). An anonymous mmap starts on a page.
        size = self.config.recv_buffer
        whole = memoryview(mmap.mmap(-1, size + DIRECT_ALIGN))
        view = whole[:size]
        stall = self.config.stall_timeout
        received = 0
        it = iter(pieces)
        cur: PieceRef | None = next(it, None)
        writer: PieceWriter | None = None
        wrote = skip  # bytes of ``cur`` consumed (a resumed first piece starts part-way)
        progress_mark = 0
        judged = False
        t_start = trio.current_time()
        scope = trio.CancelScope(deadline=t_start + stall)
        try:
            with scope:
                while cur is not None:
                    shift = pos % DIRECT_ALIGN
                    view = whole[shift : shift + size]
                    if pos < cur.offset:  # bytes between tracked pieces (not for 206 bodies)
                        want = min(size, cur.offset - pos)
                    else:
                        if writer is None and (wrote == 0 or wrote == skip == pos - cur.offset):
                            if cur.index in requested or sink.take(cur.index):
                                writer = sink.open_piece(cur.index, wrote)
                            elif whole_file and pos >= requested_end:
                                break  # nothing of ours is left in this body: stop reading it
                        want = min(size, cur.length - wrote)
                    # Fill the buffer up to a piece boundary, then hand it over in one
                    # call: the sink hashes and pwrites big blocks off the trio thread.
                    filled = 0
                    while filled < want:
                        n = await conn.read_into(view[filled:want])
                        if n == 0:
                            raise MirrorError(f"{conn.url}: body ended at byte {pos + filled} of {cur.path}")
                        filled += n
                        received += n
                        self.bytes_received += n
                        if received - progress_mark >= self.config.stall_bytes:
                            progress_mark = received
                            now = trio.current_time()
                            scope.deadline = now + stall
                            if not judged and now - t_start >= RATE_PROBE:
                                # One look per request: grow concurrency early on a rate-limited
                                # mirror instead of waiting for 64 MiB requests to finish.
                                judged = True
                                if self.score.on_slow_connection(received / (now - t_start), self._others_healthy()):
                                    sink.wake()
                    if pos < cur.offset:
                        pos += filled
                        continue
                    if writer is not None:
                        await writer.write(view[:filled])
                    wrote += filled
                    pos += filled
                    if wrote == cur.length:
                        if writer is not None:
                            w, writer = writer, None
                            await w.finish()
                        wrote = 0
                        cur = next(it, None)
            if scope.cancelled_caught:
                raise MirrorError(f"{conn.url}: stalled (under {self.config.stall_bytes} bytes in {stall:.0f}s)")
        finally:
            if writer is not None:
                writer.abort()
        if conn.remaining:
            conn.reusable = False
        return received


def _epoch() -> float:
    return time.time()
