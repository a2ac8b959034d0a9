"""The request fields that constrain the output's form: OpenAI's `response_format`, vLLM's
`structured_outputs` and its older `guided_*` fields."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from runtime.sampling_params import STRUCTURED_FIELDS, StructuredOutputs
from server.fields import bad, field

# vLLM's fields before `structured_outputs` (removed from vLLM in 0.12, where they are now
# ignored and the output comes back unconstrained): still honoured here
GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


def structured_outputs(body: Mapping[str, Any]) -> StructuredOutputs | None:
    """OpenAI's `response_format`, or vLLM's `structured_outputs` (json, json_object, regex,
    choice or grammar) or its older `guided_*` fields; the engine compiles it (an invalid
    schema is its 400)."""
    fmt = body.get("response_format")
    plain = isinstance(fmt, dict) and fmt.get("type") == "text"  # no constraint: goes with one
    given = [
        key
        for key in ("response_format", "structured_outputs", *GUIDED_FIELDS)
        if body.get(key) is not None and not (key == "response_format" and plain)
    ]
    if len(given) > 1:
        raise bad(f"set one of {', '.join(map(repr, given))}, not several", given[0])
    fmt = None if plain else field(body, "response_format", dict)
    extra, param = field(body, "structured_outputs", dict), "structured_outputs"
    if given and given[0] in GUIDED_FIELDS:
        extra, param = {GUIDED_FIELDS[given[0]]: body[given[0]]}, given[0]
    if extra is not None:
        unknown = sorted(set(extra) - set(STRUCTURED_FIELDS))
        if unknown:
            raise bad(f"unknown structured_outputs fields: {unknown}", param)
        try:
            return StructuredOutputs(**extra)
        except ValueError as exc:
            raise bad(str(exc), param) from None
    if fmt is None:
        return None
    if fmt.get("type") == "json_object":
        return StructuredOutputs(json_object=True)
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad("'response_format.json_schema.schema' must be an object", "response_format")
        return StructuredOutputs(json=schema)
    raise bad(
        "'response_format.type' must be 'text', 'json_object' or 'json_schema'", "response_format"
    )
