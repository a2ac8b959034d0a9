"""A request's JSON: the body parsed, its fields read with their types checked (those never
read logged as ignored), and the error a bad request gets (OpenAI's shape)."""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

logger = logging.getLogger(__name__)
Parsed = TypeVar("Parsed")

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


class Fields(Mapping[str, Any]):
    """A request body that records which of its fields were looked up (`get`, `[]`, `in`):
    those the parser never looked at are the ones the server ignored. `body | {k: v}` is a
    copy with k set to v that records into the same set."""

    def __init__(self, body: Mapping[str, Any], read: set[str] | None = None) -> None:
        self._body = body
        self.read = set() if read is None else read

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return self._body[key]

    def __contains__(self, key: object) -> bool:
        self.read.add(key)
        return key in self._body

    def __iter__(self):
        return iter(self._body)

    def __len__(self) -> int:
        return len(self._body)

    def __or__(self, other: Mapping[str, Any]) -> Fields:
        return Fields({**self._body, **other}, self.read)

    def unread(self) -> list[str]:
        """The body's fields nothing looked up, sorted."""
        return sorted(set(self._body) - self.read)


def warns_ignored(parse: Callable[..., Parsed]) -> Callable[..., Parsed]:
    """`parse(body, ...)` on a body that records the fields it reads: whatever it never read
    the server does not know, and ignores; those are logged, once a request, as vLLM logs
    them. So the fields known are exactly those the parser reads: no list of them to keep."""

    @functools.wraps(parse)
    def parse_noting_ignored(body: Mapping[str, Any], *args: Any) -> Parsed:
        read = Fields(body)
        parsed = parse(read, *args)
        if ignored := read.unread():
            names = ", ".join(map(repr, ignored))
            logger.warning(
                "The following fields were present in the request but ignored: {%s}", names
            )
        return parsed

    return parse_noting_ignored


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
