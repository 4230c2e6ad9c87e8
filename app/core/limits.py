"""Request body size limits, enforced while the body streams in (413 as a problem body).

Uploads (weights, sample manifests) get a larger limit than JSON bodies; both are checked
against Content-Length up front and against the bytes actually received, so a client that
lies about the length or streams chunked is still stopped."""

from __future__ import annotations

import re
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import PayloadTooLarge, problem_response


class BodyLimitMiddleware:
    def __init__(
        self, app: ASGIApp, *, default_limit: int, upload_limit: int,
        upload_paths: Iterable[str],
    ) -> None:
        self.app = app
        self.default_limit = default_limit
        self.upload_limit = upload_limit
        self.upload_paths = [re.compile(pattern) for pattern in upload_paths]

    def limit_for(self, path: str) -> int:
        if any(pattern.fullmatch(path) for pattern in self.upload_paths):
            return self.upload_limit
        return self.default_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > limit
            except ValueError:
                too_large = False
            if too_large:
                response = problem_response(
                    413, slug=PayloadTooLarge.slug, instance=scope["path"],
                    detail=f"The request body exceeds the limit of {limit} bytes.", limit=limit,
                )
                await response(scope, receive, send)
                return

        received = 0
        exceeded = started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise PayloadTooLarge(
                        f"The request body exceeds the limit of {limit} bytes.", limit=limit)
            return message

        async def guarded_send(message: Message) -> None:
            # Once the limit is hit, whatever the app makes of the aborted body read (a 400
            # from the framework's body parser, a problem from a streaming route) is
            # replaced by one 413.
            nonlocal started
            if not exceeded:
                started = started or message["type"] == "http.response.start"
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            response = problem_response(
                413, slug=PayloadTooLarge.slug, instance=scope["path"],
                detail=f"The request body exceeds the limit of {limit} bytes.", limit=limit)
            await response(scope, receive, send)
