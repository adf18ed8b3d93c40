"""The polite async HTTP fetcher: robots.txt, X-Robots-Tag opt-outs, private-address guard,
bounded concurrency, retries with backoff, manual redirects and a streaming size cap.

``Fetcher.fetch`` never raises for a problem with one URL; it returns a ``FetchResult`` whose
``status`` is one of ``STATUS_CLASSES``.
"""
from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timezone
from types import TracebackType

import aiohttp
from aiohttp.abc import AbstractResolver
from multidict import CIMultiDictProxy
from yarl import URL

from pipeline.config import IngestConfig
from pipeline.fetch.netguard import GuardedResolver, PrivateAddressError, check_literal_host
from pipeline.fetch.robots import ROBOTS_MAX_BYTES, ROBOTS_MAX_REDIRECTS, RobotsCache, RobotsRules, origin_of, rules_from_response

__all__ = ["STATUS_CLASSES", "FetchResult", "Fetcher", "is_opted_out", "parse_retry_after"]

STATUS_CLASSES: tuple[str, ...] = (
    "ok",
    "http_error",
    "timeout",
    "too_large",
    "robots_disallowed",
    "opted_out",
    "private_address",
    "redirect_loop",
    "too_many_redirects",
    "connection_error",
    "dns_error",
    "invalid_url",
    "unsupported_scheme",
    "fetch_error",  # an unexpected exception (a bug or an exotic failure); detail in `error`
)
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
NOAI_DIRECTIVES = frozenset({"noai", "noimageai"})
_RETRYABLE = frozenset({"timeout", "connection_error"})
_CHUNK = 64 * 1024


@dataclass
class FetchResult:
    """The outcome of fetching one URL (see ``STATUS_CLASSES``)."""

    url: str
    final_url: str
    status: str
    error: str | None
    body: bytes | None
    http_status: int | None
    content_type: str | None
    attempts: int


class _Failure(Exception):
    """A per-URL failure with its status class; turned into a FetchResult by ``fetch``."""

    def __init__(self, status: str, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


@dataclass
class _Reply:
    """One HTTP response; ``body`` only for a 2xx that was neither opted out nor too large."""

    status: int
    headers: CIMultiDictProxy[str]
    content_type: str | None
    body: bytes | None = None
    failure: _Failure | None = None


@dataclass
class _State:
    """Per-URL bookkeeping while following redirects and retries."""

    url: str
    final_url: str
    attempts: int = 0
    seen: set[str] = field(default_factory=set)
    reply: _Reply | None = None

    def result(self, status: str, error: str | None, body: bytes | None = None) -> FetchResult:
        r = self.reply
        return FetchResult(
            url=self.url, final_url=self.final_url, status=status, error=error, body=body,
            http_status=r.status if r else None, content_type=r.content_type if r else None,
            attempts=self.attempts,
        )


def is_opted_out(values: Iterable[str]) -> bool:
    """True if any X-Robots-Tag value carries ``noai``/``noimageai``, bare or as ``<agent>: noai``.

    Directives scoped to any user agent count: an opt-out is honoured whoever it names.
    """
    for value in values:
        for part in value.split(","):
            if part.rsplit(":", 1)[-1].strip().lower() in NOAI_DIRECTIVES:
                return True
    return False


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - time.time())


def _failure_of(exc: BaseException) -> _Failure:
    """Map an exception raised while requesting to a status class."""
    cause: BaseException | None = exc
    while cause is not None:  # the guard's error may arrive wrapped by aiohttp
        if isinstance(cause, PrivateAddressError):
            return _Failure("private_address", str(cause))
        cause = cause.__cause__
    if isinstance(exc, _Failure):
        return exc
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return _Failure("dns_error", f"DNS lookup failed: {exc}")
    if isinstance(exc, asyncio.TimeoutError):
        return _Failure("timeout", f"timed out ({type(exc).__name__})")
    if isinstance(exc, (aiohttp.InvalidURL, ValueError)):
        return _Failure("invalid_url", f"invalid URL: {exc}")
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return _Failure("connection_error", f"{type(exc).__name__}: {exc}")
    return _Failure("fetch_error", f"{type(exc).__name__}: {exc}")


def _is_tls_failure(exc: BaseException) -> bool:
    return isinstance(exc, (aiohttp.ClientSSLError, aiohttp.ServerFingerprintMismatch))


async def _read_capped(resp: aiohttp.ClientResponse, cap: int, *, truncate: bool = False) -> bytes | None:
    """Stream the body; None once it exceeds ``cap`` (or the first ``cap`` bytes if ``truncate``)."""
    buf = bytearray()
    async for chunk in resp.content.iter_chunked(_CHUNK):
        if len(buf) + len(chunk) > cap:
            return bytes(buf + chunk[: cap - len(buf)]) if truncate else None
        buf += chunk
    return bytes(buf)


class Fetcher:
    """Fetch URLs politely; use as ``async with Fetcher(cfg) as f: await f.fetch(url)``."""

    def __init__(self, cfg: IngestConfig, *, resolver: AbstractResolver | None = None) -> None:
        self.cfg = cfg
        self.requests_made = 0
        self._resolver_arg = resolver
        self._guard: GuardedResolver | None = None
        self._session: aiohttp.ClientSession | None = None
        self._global_slots: asyncio.Semaphore | None = None
        self._host_slots: dict[str, asyncio.Semaphore] = {}
        self._robots = RobotsCache(self._load_robots)

    async def __aenter__(self) -> "Fetcher":
        cfg = self.cfg
        resolver = self._resolver_arg
        if not cfg.allow_private_addresses:
            resolver = self._guard = GuardedResolver(resolver)
        connector = aiohttp.TCPConnector(
            limit=cfg.concurrency, limit_per_host=cfg.per_host_concurrency, resolver=resolver, ttl_dns_cache=60
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=cfg.timeout_s),
            headers={"User-Agent": cfg.user_agent},
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        self._global_slots = asyncio.Semaphore(cfg.concurrency)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._robots.close()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._guard is not None:
            await self._guard.close()

    async def fetch(self, url: str) -> FetchResult:
        """Fetch one URL; every per-URL problem is reported in the result, never raised."""
        if self._session is None:
            raise RuntimeError("use Fetcher as an async context manager")
        state = _State(url=url, final_url=url)
        try:
            reply = await self._follow(state)
        except Exception as exc:  # noqa: BLE001 - the contract: classify, never raise
            failure = _failure_of(exc)
            return state.result(failure.status, failure.error)
        if reply.failure is not None:
            return state.result(reply.failure.status, reply.failure.error)
        if not 200 <= reply.status < 300:
            return state.result("http_error", f"HTTP {reply.status}")
        return state.result("ok", None, reply.body)

    # -- one URL: redirects, robots, retries -------------------------------------------------

    async def _follow(self, state: _State) -> _Reply:
        """Request the URL and follow redirects, checking every hop like a fresh URL."""
        current: str | URL = state.url
        while True:
            state.final_url, state.reply = str(current), None
            target = self._checked_url(current)
            state.seen.add(str(target))
            await self._check_robots(target)
            reply = state.reply = await self._with_retries(target, state)
            location = reply.headers.get("Location") if reply.status in REDIRECT_CODES else None
            if location is None:
                return reply
            current = target.join(URL(location)).with_fragment(None)
            if str(current) in state.seen:
                raise _Failure("redirect_loop", f"redirect loop: {target} -> {current}")
            if len(state.seen) > self.cfg.max_redirects:
                raise _Failure("too_many_redirects", f"more than {self.cfg.max_redirects} redirects")

    def _checked_url(self, url: str | URL) -> URL:
        """Parse and vet a URL: scheme, host, and (unless allowed) a literal non-public IP."""
        try:
            u = url if isinstance(url, URL) else URL(url)
        except (ValueError, TypeError) as exc:
            raise _Failure("invalid_url", f"invalid URL: {exc}") from None
        if u.scheme and u.scheme.lower() not in ("http", "https"):
            raise _Failure("unsupported_scheme", f"unsupported scheme {u.scheme!r}")
        if not u.scheme or not u.raw_host:
            raise _Failure("invalid_url", f"not an absolute http(s) URL: {url}")
        if not self.cfg.allow_private_addresses:
            check_literal_host(u.raw_host)
        return u.with_fragment(None)

    async def _check_robots(self, url: URL) -> None:
        if not self.cfg.respect_robots:
            return
        rules = await self._robots.rules_for(url)
        if not rules.allowed(str(url), self.cfg.user_agent):
            raise _Failure("robots_disallowed", f"{url} disallowed ({rules.reason})")

    async def _with_retries(self, url: URL, state: _State) -> _Reply:
        """One hop: retry timeouts, connection errors, 429 and 5xx with exponential backoff."""
        cfg = self.cfg
        for attempt in range(cfg.retries + 1):
            last = attempt == cfg.retries
            delay = cfg.backoff_s * (2**attempt)
            try:
                reply = await self._attempt(url, state)
            except Exception as exc:  # noqa: BLE001
                failure = _failure_of(exc)
                if last or failure.status not in _RETRYABLE or _is_tls_failure(exc):
                    raise failure from exc
                await asyncio.sleep(delay)
                continue
            if last or not (reply.status == 429 or reply.status >= 500):
                return reply
            if reply.status in (429, 503):
                wait = parse_retry_after(reply.headers.get("Retry-After"))
                if wait is not None and wait > cfg.max_retry_after_s:
                    raise _Failure(
                        "http_error",
                        f"HTTP {reply.status} with Retry-After {wait:.0f}s > max_retry_after_s={cfg.max_retry_after_s:g}",
                    )
                delay = max(delay, wait or 0.0)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _attempt(self, url: URL, state: _State) -> _Reply:
        """Exactly one HTTP request (in the host's and the global slots)."""
        assert self._session is not None
        async with self._slot(url):
            state.attempts += 1
            self.requests_made += 1
            try:
                async with self._session.get(url, allow_redirects=False) as resp:
                    return await self._reply(resp)
            except PrivateAddressError:
                state.attempts -= 1  # refused before any byte was sent
                self.requests_made -= 1
                raise

    async def _reply(self, resp: aiohttp.ClientResponse) -> _Reply:
        """Turn a response into a _Reply, reading the body only for an acceptable 2xx."""
        ctype = resp.content_type if "Content-Type" in resp.headers else None
        reply = _Reply(resp.status, resp.headers, ctype)
        if not 200 <= resp.status < 300:
            return reply
        if self.cfg.respect_noai and is_opted_out(resp.headers.getall("X-Robots-Tag", [])):
            reply.failure = _Failure("opted_out", "X-Robots-Tag: " + ", ".join(resp.headers.getall("X-Robots-Tag")))
            return reply
        cap = self.cfg.max_bytes
        if resp.content_length is not None and resp.content_length > cap:
            reply.failure = _Failure("too_large", f"Content-Length {resp.content_length} > max_bytes={cap}")
            return reply
        reply.body = await _read_capped(resp, cap)
        if reply.body is None:
            reply.failure = _Failure("too_large", f"body exceeds max_bytes={cap}")
        return reply

    @asynccontextmanager
    async def _slot(self, url: URL) -> AsyncIterator[None]:
        """Hold one of the host's slots, then one global slot (host first: no global hogging)."""
        assert self._global_slots is not None
        key = origin_of(url)
        host_slots = self._host_slots.get(key)
        if host_slots is None:
            host_slots = self._host_slots[key] = asyncio.Semaphore(self.cfg.per_host_concurrency)
        async with host_slots, self._global_slots:
            yield

    # -- robots.txt --------------------------------------------------------------------------

    async def _load_robots(self, robots: URL) -> RobotsRules:
        """Fetch one robots.txt (following ≤5 redirects). A private or unresolvable origin
        raises (so its URLs report that); other failures mean 'unreachable' → disallow all."""
        assert self._session is not None
        target, location = robots, None
        for hop in range(ROBOTS_MAX_REDIRECTS + 1):
            try:
                if hop:
                    target = self._checked_url(target.join(URL(location)))
                status, location, body = await self._robots_request(target)
            except Exception as exc:  # noqa: BLE001
                failure = _failure_of(exc)
                if hop == 0 and failure.status in ("private_address", "dns_error"):
                    raise failure from exc
                return RobotsRules(disallow_all=True, reason=f"robots.txt unreachable: {failure.error}")
            if status in REDIRECT_CODES and location:
                continue
            return rules_from_response(status, body)
        return RobotsRules(allow_all=True, reason="robots.txt: too many redirects (treated as unavailable)")

    async def _robots_request(self, url: URL) -> tuple[int, str | None, bytes | None]:
        """One robots.txt request: status, Location, and the (truncated) body of a 2xx."""
        assert self._session is not None
        async with self._slot(url):
            self.requests_made += 1
            try:
                async with self._session.get(url, allow_redirects=False) as resp:
                    ok = 200 <= resp.status < 300
                    body = await _read_capped(resp, ROBOTS_MAX_BYTES, truncate=True) if ok else None
                    return resp.status, resp.headers.get("Location"), body
            except PrivateAddressError:
                self.requests_made -= 1
                raise
