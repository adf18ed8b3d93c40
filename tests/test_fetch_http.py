"""Fetcher against a real local HTTP server: statuses, retries, redirects, limits, opt-outs."""
from __future__ import annotations

import asyncio
import email.utils
import socket
import time

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from pipeline.fetch import STATUS_CLASSES, is_opted_out, parse_retry_after

try:
    from httpfixtures import LocalServer, fetch_all, fetch_one, make_cfg, server  # noqa: F401  (fixture)
except ImportError:  # tests/ became a package
    from tests.httpfixtures import LocalServer, fetch_all, fetch_one, make_cfg, server  # noqa: F401


def test_status_classes_listed() -> None:
    assert STATUS_CLASSES[0] == "ok"
    for s in ("http_error", "timeout", "too_large", "robots_disallowed", "opted_out", "private_address",
              "redirect_loop", "too_many_redirects", "connection_error", "dns_error", "invalid_url", "unsupported_scheme"):
        assert s in STATUS_CLASSES


def test_ok_image(server: LocalServer) -> None:
    r = fetch_one(make_cfg(), server.url("/img.jpg"))
    assert (r.status, r.error, r.http_status, r.attempts) == ("ok", None, 200, 1)
    assert r.body == server.image and r.content_type == "image/jpeg"
    assert r.final_url == r.url == server.url("/img.jpg")
    assert server.counts["/img.jpg"] == 1 and server.counts["/robots.txt"] == 1


def test_404_not_retried(server: LocalServer) -> None:
    r = fetch_one(make_cfg(), server.url("/status/404"))
    assert r.status == "http_error" and "404" in (r.error or "") and r.body is None
    assert r.attempts == 1 and server.counts["/status/404"] == 1


def test_500_retried_then_http_error(server: LocalServer) -> None:
    r = fetch_one(make_cfg(retries=3), server.url("/status/500"))
    assert r.status == "http_error" and "500" in (r.error or "") and r.http_status == 500
    assert r.attempts == 4 and server.counts["/status/500"] == 4


def test_flaky_503_then_ok(server: LocalServer) -> None:
    r = fetch_one(make_cfg(retries=2), server.url("/flaky/2"))
    assert r.status == "ok" and r.attempts == 3 and server.counts["/flaky/2"] == 3


def test_backoff_doubles(server: LocalServer) -> None:
    t0 = time.monotonic()
    r = fetch_one(make_cfg(retries=2, backoff_s=0.2), server.url("/status/502"))
    assert r.status == "http_error" and r.attempts == 3
    assert time.monotonic() - t0 >= 0.2 + 0.4 - 0.05


def test_429_retry_after_seconds_honoured(server: LocalServer) -> None:
    t0 = time.monotonic()
    r = fetch_one(make_cfg(), server.url("/retry-after/1"))
    assert r.status == "ok" and r.attempts == 2
    assert time.monotonic() - t0 >= 0.95


def test_429_retry_after_too_long_gives_up(server: LocalServer) -> None:
    t0 = time.monotonic()
    r = fetch_one(make_cfg(max_retry_after_s=5), server.url("/retry-after/3600"))
    assert r.status == "http_error" and "Retry-After" in (r.error or "") and r.attempts == 1
    assert time.monotonic() - t0 < 2


def test_parse_retry_after_http_date() -> None:
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 27 <= (parse_retry_after(later) or 0) <= 31
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    assert parse_retry_after(email.utils.formatdate(time.time() - 100, usegmt=True)) == 0.0


def test_slow_response_times_out(server: LocalServer) -> None:
    t0 = time.monotonic()
    r = fetch_one(make_cfg(timeout_s=0.3, retries=1), server.url("/slow/3"))
    assert r.status == "timeout" and r.attempts == 2 and server.counts["/slow/3"] == 2
    assert time.monotonic() - t0 < 2.5


@pytest.mark.parametrize("with_length", [True, False])
def test_too_large(server: LocalServer, with_length: bool) -> None:
    path = f"/big/{2_000_000}"
    r = fetch_one(make_cfg(max_bytes=100_000), server.url(path + ("?cl=1" if with_length else "?cl=0")))
    assert r.status == "too_large" and r.body is None and r.attempts == 1
    assert ("Content-Length" in (r.error or "")) == with_length
    assert server.counts[path] == 1


def test_body_at_cap_is_ok(server: LocalServer) -> None:
    r = fetch_one(make_cfg(max_bytes=65536 * 4), server.url("/big/262144?cl=0"))
    assert r.status == "ok" and len(r.body or b"") == 262144


def test_redirect_chain_ok(server: LocalServer) -> None:
    r = fetch_one(make_cfg(max_redirects=5), server.url("/redirect/3"))
    assert r.status == "ok" and r.final_url == server.url("/redirect/0") and r.body == server.image
    assert r.attempts == 4
    assert all(server.counts[f"/redirect/{i}"] == 1 for i in range(4))


def test_redirect_loop(server: LocalServer) -> None:
    r = fetch_one(make_cfg(), server.url("/loop/a"))
    assert r.status == "redirect_loop" and r.attempts == 2
    assert server.counts["/loop/a"] == 1 and server.counts["/loop/b"] == 1


def test_too_many_redirects(server: LocalServer) -> None:
    r = fetch_one(make_cfg(max_redirects=2), server.url("/redirect/5"))
    assert r.status == "too_many_redirects" and r.attempts == 3
    assert server.counts["/redirect/5"] == server.counts["/redirect/3"] == 1 and server.counts["/redirect/2"] == 0


def test_zero_redirects_allowed(server: LocalServer) -> None:
    assert fetch_one(make_cfg(max_redirects=0), server.url("/redirect/1")).status == "too_many_redirects"
    assert fetch_one(make_cfg(max_redirects=0), server.url("/redirect/0")).status == "ok"


@pytest.mark.parametrize("value", ["noai", "noimageai", "noindex, NoAI", "lvd-curate: noimageai", "otherbot: noai"])
def test_x_robots_tag_opted_out(server: LocalServer, value: str) -> None:
    r = fetch_one(make_cfg(), server.url(f"/xrobots?v={value}"))
    assert r.status == "opted_out" and r.body is None and r.http_status == 200 and r.attempts == 1


def test_x_robots_tag_other_directives_ok(server: LocalServer) -> None:
    assert fetch_one(make_cfg(), server.url("/xrobots?v=noindex, nofollow")).status == "ok"
    assert fetch_one(make_cfg(respect_noai=False), server.url("/xrobots?v=noai")).status == "ok"


def test_is_opted_out_parsing() -> None:
    assert is_opted_out(["noindex", "googlebot: noimageai"])
    assert is_opted_out([" NOAI "])
    assert not is_opted_out(["noindex, nofollow", "unavailable_after: 25 Jun 2010 15:00:00 PST"])
    assert not is_opted_out([])


def test_per_host_concurrency_bounded(server: LocalServer) -> None:
    urls = [server.url(f"/concurrent?i={i}") for i in range(8)]
    results, _ = asyncio.run(fetch_all(make_cfg(per_host_concurrency=2), urls))
    assert all(r.status == "ok" for r in results)
    assert server.counts["/concurrent"] == 8
    assert server.max_inflight == 2


def test_global_concurrency_bounded(server: LocalServer) -> None:
    urls = [server.url(f"/concurrent?i={i}", host=h) for i in range(3) for h in ("127.0.0.1", "localhost")]
    results, _ = asyncio.run(fetch_all(make_cfg(per_host_concurrency=4, concurrency=1), urls))
    assert all(r.status == "ok" for r in results)
    assert server.max_inflight == 1


def test_user_agent_on_every_request(server: LocalServer) -> None:
    server.robots = "User-agent: *\nAllow: /\n"
    cfg = make_cfg(user_agent="test-crawler/9.9 (+https://example.org/bot)")
    results, made = asyncio.run(fetch_all(cfg, [server.url("/img.jpg"), server.url("/redirect/2")]))
    assert [r.status for r in results] == ["ok", "ok"]
    assert made == server.total == 5  # robots + img + 3 redirect hops
    assert server.user_agents == ["test-crawler/9.9 (+https://example.org/bot)"] * 5


def test_connection_refused_retried(server: LocalServer) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    r = fetch_one(make_cfg(retries=2, respect_robots=False), f"http://127.0.0.1:{port}/x.jpg")
    assert r.status == "connection_error" and r.attempts == 3 and r.http_status is None


class _FakeDNS(AbstractResolver):
    """Maps every name to 127.0.0.1, or fails like an unknown name."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[str] = []

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        self.calls.append(host)
        if self.fail:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [ResolveResult(hostname=host, host="127.0.0.1", port=port, family=socket.AF_INET, proto=0,
                              flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)]

    async def close(self) -> None:
        pass


def test_custom_resolver_used_for_connections(server: LocalServer) -> None:
    dns = _FakeDNS()
    results, _ = asyncio.run(fetch_all(make_cfg(), [server.url("/img.jpg", host="images.example")], resolver=dns))
    assert results[0].status == "ok" and "images.example" in dns.calls


def test_dns_error(server: LocalServer) -> None:
    results, made = asyncio.run(fetch_all(make_cfg(), [server.url("/img.jpg", host="nowhere.example")], resolver=_FakeDNS(fail=True)))
    assert results[0].status == "dns_error" and server.total == 0


@pytest.mark.parametrize(
    ("url", "status"),
    [("ftp://example.org/a.jpg", "unsupported_scheme"), ("data:image/png;base64,AAAA", "unsupported_scheme"),
     ("http://", "invalid_url"), ("not a url", "invalid_url"), ("http://[::1/x", "invalid_url")],
)
def test_bad_urls(url: str, status: str) -> None:
    results, made = asyncio.run(fetch_all(make_cfg(), [url]))
    assert results[0].status == status and results[0].attempts == 0 and made == 0
