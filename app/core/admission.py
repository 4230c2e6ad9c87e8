"""Admission control: at most N requests inside the application at once.

Sync routes and dependencies run on a threadpool, and a request holds a pooled database
connection across several threadpool hops (dependencies, the route, response validation).
Unbounded, a burst can fill every thread with requests waiting for a connection while the
requests holding connections wait for a thread: a deadlock until the pool times out. Admitting
no more requests than there are connections (and threads) makes that impossible; the rest wait
here, in arrival order, without holding anything.

Exempt: what holds neither a thread nor a connection per request (the health probe, and the
intake route, which waits in its group commit: one connection per batch, not per request)."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Receive, Scope, Send


class AdmissionMiddleware:
    def __init__(self, app: ASGIApp, *, limit: int, exempt: frozenset[str] = frozenset(),
                 exempt_routes: frozenset[tuple[str, str]] = frozenset()) -> None:
        self.app = app
        self.limit = limit
        self.exempt = exempt
        self.exempt_routes = exempt_routes  # (method, path)
        self._semaphore: asyncio.Semaphore | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["path"] in self.exempt
                or (scope["method"], scope["path"]) in self.exempt_routes):
            await self.app(scope, receive, send)
            return
        if self._semaphore is None:  # created on the serving event loop
            self._semaphore = asyncio.Semaphore(self.limit)
        async with self._semaphore:
            await self.app(scope, receive, send)
