"""robots.txt rules (RFC 9309) and a per-origin cache that loads each robots.txt once.

Fetching is the caller's job (the ``Fetcher`` passes a loader), so this module has no network
code: it turns a robots.txt response into rules and makes concurrent callers share one load.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.robotparser import RobotFileParser

from yarl import URL

__all__ = ["ROBOTS_MAX_BYTES", "ROBOTS_MAX_REDIRECTS", "RobotsCache", "RobotsRules", "origin_of", "robots_url", "rules_from_response"]

ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309 §2.5: parse at least 500 KiB
ROBOTS_MAX_REDIRECTS = 5  # RFC 9309 §2.3.1.2


def origin_of(url: URL) -> str:
    """``scheme://host[:port]`` — the unit robots.txt and per-host limits apply to."""
    return str(url.origin())


def robots_url(url: URL) -> URL:
    """The robots.txt URL governing ``url``."""
    return url.origin().with_path("/robots.txt")


@dataclass(frozen=True)
class RobotsRules:
    """What one origin's robots.txt allows; ``allow_all``/``disallow_all`` short-cut parsing."""

    allow_all: bool = False
    disallow_all: bool = False
    parser: RobotFileParser | None = None
    reason: str = ""

    def allowed(self, url: str, user_agent: str) -> bool:
        """Whether ``user_agent`` may fetch ``url`` under these rules."""
        if self.disallow_all:
            return False
        if self.allow_all or self.parser is None:
            return True
        return self.parser.can_fetch(user_agent, url)


def rules_from_response(status: int | None, body: bytes | None) -> RobotsRules:
    """Rules from a robots.txt fetch: 2xx → parsed; 4xx → allow all; 5xx/unreachable → disallow all.

    ``status`` is None when the server could not be reached at all.
    """
    if status is None:
        return RobotsRules(disallow_all=True, reason="robots.txt unreachable")
    if 200 <= status < 300:
        parser = RobotFileParser()
        parser.parse((body or b"")[:ROBOTS_MAX_BYTES].decode("utf-8", errors="replace").splitlines())
        return RobotsRules(parser=parser, reason="robots.txt")
    if 400 <= status < 500:
        return RobotsRules(allow_all=True, reason=f"robots.txt HTTP {status}")
    return RobotsRules(disallow_all=True, reason=f"robots.txt HTTP {status}")


class RobotsCache:
    """One robots.txt load per origin; concurrent callers for the same origin await the same load.

    The loader's exception (e.g. the origin is a private address) is re-raised to every caller.
    """

    def __init__(self, loader: Callable[[URL], Awaitable[RobotsRules]]) -> None:
        self._loader = loader
        self._tasks: dict[str, asyncio.Task[RobotsRules]] = {}

    async def rules_for(self, url: URL) -> RobotsRules:
        """The rules governing ``url``, loading its origin's robots.txt on first use."""
        origin = origin_of(url)
        task = self._tasks.get(origin)
        if task is None:  # no await between the lookup and the insert: one task per origin
            task = asyncio.ensure_future(self._loader(robots_url(url)))
            self._tasks[origin] = task
        return await asyncio.shield(task)

    async def close(self) -> None:
        """Cancel loads still in flight (on Fetcher exit)."""
        pending = [t for t in self._tasks.values() if not t.done()]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for t in self._tasks.values():  # mark exceptions as retrieved
            if t.done() and not t.cancelled():
                t.exception()
