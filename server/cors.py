"""CORS, as vLLM's server answers it: browser pages from the allowed origins may call every
route (aiohttp-cors), and their preflights pass the server's own gates."""

from __future__ import annotations

import aiohttp_cors
from aiohttp import hdrs, web

# the request headers CORS always lets through (Starlette's, which vLLM's CORS is)
SAFELISTED_HEADERS = ("Accept", "Accept-Language", "Content-Language", "Content-Type")


def allow_cors(
    app: web.Application,
    origins: tuple[str, ...],
    methods: tuple[str, ...],
    headers: tuple[str, ...],
    credentials: bool,
) -> None:
    """CORS on every route: preflights from `origins` answered, and every response to such an
    origin, errors and streams too, readable by its page ("*": any; no origins, no CORS)."""
    if not origins:
        return
    options = aiohttp_cors.ResourceOptions(
        allow_credentials=credentials,
        allow_headers="*" if "*" in headers else (*headers, *SAFELISTED_HEADERS),
        allow_methods="*" if "*" in methods else methods,
    )
    cors = aiohttp_cors.setup(app, defaults=dict.fromkeys(origins, options))
    # whole resources, not routes: a route's own entry would allow its method whatever
    # allow_methods says
    for resource in list(app.router.resources()):
        cors.add(resource)


def is_preflight(request: web.Request) -> bool:
    """A CORS preflight: it carries no API key, and the page must see the real request's
    status, not a refused preflight."""
    return (
        request.method == hdrs.METH_OPTIONS
        and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
    )
