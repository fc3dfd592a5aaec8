"""Who may call the web port: the API token and the browser origins (CORS).

The live streams and the table queries read the events themselves, so they
ask for a token: ``Authorization: Bearer <token>``, or ``?token=<token>`` for
a browser's ``EventSource`` and ``WebSocket``, which cannot set headers.
Health, counters and metrics stay open: probes and Prometheus scrapers carry
no token, and they show counts, never an event. The dashboard page is open
too; it holds no data and asks for the token before it connects.

Auth is on unless ``AGGREGATOR_AUTH=off``. With auth on and no
``AGGREGATOR_API_TOKEN``, the worker makes a token once and keeps it in
``<data dir>/api-token`` (mode 0600), so that it survives restarts; the log
says where it is, never what it is. Workers that route table queries to each
other must share one token: set ``AGGREGATOR_API_TOKEN`` on all of them.

CORS: a request whose ``Origin`` is in ``AGGREGATOR_CORS_ORIGINS`` (or any
origin, with ``*``) gets ``Access-Control-Allow-Origin`` for that origin; a
preflight (``OPTIONS``) from it is answered here with the methods and the
``Authorization`` header allowed. Other origins get no CORS header, so a
browser keeps the answer from their pages.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from aggregator_app.settings import Settings

__all__ = [
    "PROTECTED_PREFIXES",
    "TOKEN_FILE",
    "Access",
    "access_middleware",
    "cors_headers",
    "load_access",
]

logger = logging.getLogger(__name__)

#: Paths that need the token (prefixes, after the app's ``/aggregator``).
PROTECTED_PREFIXES = (
    "/aggregator/stream/",
    "/aggregator/tables/",
    "/aggregator/dedup/",
)
TOKEN_FILE = "api-token"

_CORS_MAX_AGE_S = 600
_ALLOWED_HEADERS = "Authorization, Content-Type, Last-Event-ID"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Access:
    """The token a worker asks for (``None``: auth is off) and its origins."""

    token: str | None
    cors_origins: tuple[str, ...]

    def allows(self, request: web.Request) -> bool:
        """Return whether the request carries the token (always, with auth off)."""
        if self.token is None:
            return True
        offered = _offered_token(request)
        return offered is not None and hmac.compare_digest(
            offered.encode(), self.token.encode()
        )

    def allowed_origin(self, origin: str | None) -> str | None:
        """Return the value of ``Access-Control-Allow-Origin`` for an origin."""
        if not origin:
            return None
        if "*" in self.cors_origins or origin.rstrip("/") in self.cors_origins:
            return origin
        return None


def load_access(settings: Settings) -> Access:
    """Return the access rules of a worker, making its token if it has none."""
    if not settings.auth:
        logger.warning("access: auth is off: streams and table queries are open")
        return Access(token=None, cors_origins=settings.cors_origins)
    token = settings.api_token or _stored_token(settings.data_dir / TOKEN_FILE)
    return Access(token=token, cors_origins=settings.cors_origins)


def _stored_token(path: Path) -> str:
    """Return the token kept in ``path``, made and written on first use."""
    if path.exists():
        token = path.read_text().strip()
        if token:
            logger.info("access: token read: path=%s", path)
            return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(token + "\n")
    logger.warning("access: no AGGREGATOR_API_TOKEN, a token was made: path=%s", path)
    return token


def _offered_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.query.get("token") or None


def _protected(path: str) -> bool:
    return path.startswith(PROTECTED_PREFIXES)


def access_middleware(access: Access) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Return the aiohttp middleware that applies ``access`` to every request.

    1. A CORS preflight is answered here, before any view.
    2. A protected path without the token gets 401.
    3. Every answer to an allowed origin carries the CORS headers.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = access.allowed_origin(request.headers.get("Origin"))

        # Step 1.
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in (
            request.headers
        ):
            return _preflight(origin)

        # Step 2.
        if _protected(request.path) and not access.allows(request):
            response: web.StreamResponse = web.json_response(
                {"error": "a valid token is needed: Authorization: Bearer, or ?token="},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="aggregator"'},
            )
        else:
            response = await handler(request)

        # Step 3.
        if origin is not None and not response.prepared:
            _add_cors(response, origin)
        return response

    return middleware


def cors_headers(access: Access, request: web.Request) -> dict[str, str]:
    """Return the CORS headers of an answer a view prepares itself (a stream)."""
    origin = access.allowed_origin(request.headers.get("Origin"))
    if origin is None:
        return {}
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}


def _preflight(origin: str | None) -> web.Response:
    if origin is None:
        return web.Response(status=403, text="origin not allowed")
    response = web.Response(status=204)
    _add_cors(response, origin)
    response.headers["Access-Control-Allow-Methods"] = "GET, OPTIONS"
    response.headers["Access-Control-Allow-Headers"] = _ALLOWED_HEADERS
    response.headers["Access-Control-Max-Age"] = str(_CORS_MAX_AGE_S)
    return response


def _add_cors(response: web.StreamResponse, origin: str) -> None:
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Vary"] = "Origin"
