"""robots.txt: fetched once per host, obeyed before any request, RFC 9309 status handling."""
from __future__ import annotations

import asyncio
import socket

import pytest

from pipeline.fetch import rules_from_response

try:
    from httpfixtures import LocalServer, fetch_all, fetch_one, make_cfg, server  # noqa: F401  (fixture)
except ImportError:  # tests/ became a package
    from tests.httpfixtures import LocalServer, fetch_all, fetch_one, make_cfg, server  # noqa: F401

UA = "lvd-curate/0.1 (test)"
ROBOTS = "User-agent: *\nDisallow: /private/\n\nUser-agent: otherbot\nDisallow: /\n"


def test_disallowed_path_gets_no_request_and_robots_fetched_once(server: LocalServer) -> None:
    server.robots = ROBOTS
    urls = [server.url(f"/img.jpg?i={i}") for i in range(10)] + [server.url(f"/private/{i}.jpg") for i in range(10)]
    results, made = asyncio.run(fetch_all(make_cfg(user_agent=UA), urls))
    assert [r.status for r in results] == ["ok"] * 10 + ["robots_disallowed"] * 10
    assert all(r.attempts == 0 and r.http_status is None for r in results[10:])
    assert server.counts["/robots.txt"] == 1
    assert not any(p.startswith("/private/") for p in server.counts)
    assert server.counts["/img.jpg"] == 10 and made == 11


def test_agent_specific_group(server: LocalServer) -> None:
    server.robots = "User-agent: *\nAllow: /\n\nUser-agent: lvd-curate\nDisallow: /img.jpg\n"
    assert fetch_one(make_cfg(user_agent=UA), server.url("/img.jpg")).status == "robots_disallowed"
    assert fetch_one(make_cfg(user_agent=UA), server.url("/other.jpg")).status == "ok"
    assert server.counts["/img.jpg"] == 0


def test_redirect_hop_into_disallowed_path(server: LocalServer) -> None:
    server.robots = ROBOTS
    r = fetch_one(make_cfg(), server.url("/goto?to=/private/secret.jpg"))
    assert r.status == "robots_disallowed" and r.final_url == server.url("/private/secret.jpg")
    assert r.attempts == 1 and server.counts["/goto"] == 1 and server.counts["/private/secret.jpg"] == 0


def test_robots_500_disallows_everything(server: LocalServer) -> None:
    server.robots = 500
    results, made = asyncio.run(fetch_all(make_cfg(), [server.url("/img.jpg"), server.url("/a.jpg")]))
    assert [r.status for r in results] == ["robots_disallowed"] * 2
    assert "500" in (results[0].error or "")
    assert server.counts["/robots.txt"] == 1 and server.total == 1 and made == 1


@pytest.mark.parametrize("code", [404, 403, 410])
def test_robots_4xx_allows_everything(server: LocalServer, code: int) -> None:
    server.robots = code
    assert fetch_one(make_cfg(), server.url("/img.jpg")).status == "ok"
    assert server.counts["/robots.txt"] == 1


def test_robots_redirect_followed(server: LocalServer) -> None:
    server.robots = "redirect:/moved/robots.txt"
    server.texts["/moved/robots.txt"] = ROBOTS
    results, made = asyncio.run(fetch_all(make_cfg(), [server.url("/img.jpg"), server.url("/private/x.jpg")]))
    assert [r.status for r in results] == ["ok", "robots_disallowed"]
    assert server.counts["/robots.txt"] == server.counts["/moved/robots.txt"] == 1
    assert server.counts["/private/x.jpg"] == 0 and made == 3


def test_robots_redirect_loop_treated_as_unavailable(server: LocalServer) -> None:
    server.robots = "redirect:/robots.txt"
    assert fetch_one(make_cfg(), server.url("/img.jpg")).status == "ok"
    assert server.counts["/robots.txt"] == 6  # the first fetch + 5 redirects, then "unavailable" = allow


def test_robots_not_respected_when_disabled(server: LocalServer) -> None:
    server.robots = "User-agent: *\nDisallow: /\n"
    assert fetch_one(make_cfg(respect_robots=False), server.url("/img.jpg")).status == "ok"
    assert server.counts["/robots.txt"] == 0 and server.counts["/img.jpg"] == 1


def test_robots_unreachable_disallows() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    results, made = asyncio.run(fetch_all(make_cfg(), [f"http://127.0.0.1:{port}/a.jpg", f"http://127.0.0.1:{port}/b.jpg"]))
    assert [r.status for r in results] == ["robots_disallowed"] * 2
    assert "unreachable" in (results[0].error or "") and results[0].attempts == 0
    assert made == 1  # one robots.txt attempt, no request for the images


def test_rules_from_response_unit() -> None:
    rules = rules_from_response(200, ROBOTS.encode())
    assert rules.allowed("http://h/img.jpg", UA) and not rules.allowed("http://h/private/x", UA)
    assert not rules.allowed("http://h/img.jpg", "otherbot/1.0")
    assert rules_from_response(404, None).allowed("http://h/private/x", UA)
    assert not rules_from_response(503, None).allowed("http://h/", UA)
    assert not rules_from_response(None, None).allowed("http://h/", UA)
    assert rules_from_response(200, b"").allowed("http://h/anything", UA)
