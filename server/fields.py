"""A request's JSON: the body parsed, its fields read with their types checked, and the
error a bad request gets (OpenAI's shape)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    500: "server_error",
    503: "service_unavailable_error",
}
TYPE_NAMES = {int: "an integer", float: "a number", bool: "a boolean", str: "a string"}
TYPE_NAMES |= {list: "an array", dict: "an object"}


class ProtocolError(Exception):
    """A request the server refuses: HTTP status plus the OpenAI error fields."""

    def __init__(
        self, status: int, message: str, param: str | None = None, type: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        fallback = "invalid_request_error" if status < 500 else "server_error"
        self.type = type or ERROR_TYPES.get(status, fallback)


def bad(message: str, param: str | None = None) -> ProtocolError:
    return ProtocolError(400, message, param)


def parse_body(content_type: str, raw: bytes) -> dict[str, Any]:
    if content_type != "application/json":
        raise bad(f"Content-Type must be application/json, not {content_type}")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise bad(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    return body


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def field(body: Mapping[str, Any], key: str, kind: type, default: Any = None) -> Any:
    """body[key] checked against `kind` (bool is not an int here); `default` when absent or null."""
    value = body.get(key)
    if value is None:
        return default
    kinds = (int, float) if kind is float else kind
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kinds):
        raise bad(f"'{key}' must be {TYPE_NAMES[kind]}", key)
    if kind is float and not math.isfinite(value):
        raise bad(f"'{key}' must be finite", key)
    return float(value) if kind is float else value
