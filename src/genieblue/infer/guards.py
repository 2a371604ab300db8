"""What stands in front of the OpenAI-compatible app: the OpenAI error body, and `Guard`, a plain ASGI
middleware that checks the API key of every /v1 route and caps the request body before the app sees
the request.

A body over the cap is refused as soon as its Content-Length (or, sent in chunks, its running size)
shows it, so it is never held whole in memory, and the connection is closed rather than read to the
end. A refused request gets the same {"error": {"message", "type", "param", "code"}} body as any
other bad request.
"""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

API_PREFIX = "/v1"


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    type: str = "invalid_request_error",
    headers: dict | None = None,
) -> JSONResponse:
    """An OpenAI-style error reply."""
    error = {"message": message, "type": type, "param": param, "code": code}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


class Guard:
    """ASGI middleware: `Authorization: Bearer <api_key>` on /v1 routes (when a key is set), and at
    most `max_body_bytes` of request body, read here and handed on whole."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.api_key and scope["path"].startswith(API_PREFIX) and not self._authorised(headers.get("authorization")):
            refusal = self._refuse(
                401,
                "missing or wrong API key: send the server's key as `Authorization: Bearer "
                "<key>` (the OpenAI client's api_key)",
                "invalid_api_key",
                {"www-authenticate": "Bearer"},
            )
            return await refusal(scope, receive, send)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._too_large(int(declared))(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await self._too_large(size, "at least ")(scope, receive, send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # e.g. a streaming reply listening for a disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _authorised(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def _too_large(self, size: int, qualifier: str = "") -> JSONResponse:
        return self._refuse(
            413,
            f"the request body is {qualifier}{size} bytes, over this server's limit of "
            f"{self.max_body_bytes} (genieblue serve --max-body-mb)",
            "request_too_large",
        )

    @staticmethod
    def _refuse(status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
        """A refusal before the body was read: the connection closes, the rest is never read."""
        return error_response(status, message, code=code, headers={"connection": "close", **(headers or {})})
