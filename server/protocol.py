"""Request parsing and validation: JSON in, typed requests out, ProtocolError on bad input."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from runtime.sampling_params import SamplingParams
from server.chat import parse_messages, render_chat
from server.constraints import structured_outputs
from server.fields import ProtocolError, bad, field, warns_ignored
from server.reasoning import REASONING_PARSERS, ReasoningParser
from server.tools import ForcedCalls, ToolChoice, ToolsError, parse_tools

# /v1/completions without max_tokens (OpenAI's and vLLM's default); chat: what fits
COMPLETION_MAX_TOKENS = 16
_SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingParams))
_FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)
_INT_FIELDS = ("top_k", "seed", "n", "min_tokens")
_BOOL_FIELDS = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens")


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What parsing needs to know about the served model."""

    name: str
    max_model_len: int
    vocab_size: int
    tokenizer: Any  # None for token-id-only artifacts
    default_params: Mapping[str, Any]
    max_n: int
    tool_call_parser: str | None = None  # tool_choice "auto" needs one
    priority_scheduling: bool = False  # the engine orders requests by their `priority`
    reasoning_parser: str | None = None  # chat outputs' thinking split from their answer


@dataclass(frozen=True, slots=True)
class Prompt:
    """One engine request: its token ids, its text when known, and its sampling parameters."""

    token_ids: tuple[int, ...]
    text: str | None
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """A completion or chat request; it yields len(prompts) * n choices."""

    chat: bool
    prompts: tuple[Prompt, ...]
    n: int
    stream: bool
    include_usage: bool
    echo: bool  # completions only: prefix each choice with its prompt text (and logprobs)
    top_logprobs: int | None  # alternatives shown per token; None: no logprobs
    echo_only: bool = False  # echo with max_tokens 0: the prompt, and no completion token
    tool_choice: ToolChoice | None = None  # chat: the function calls the output must be
    # vLLM's `return_token_ids`: the prompt's and each choice's token ids beside the text
    return_token_ids: bool = False
    tokens_as_ids: bool = False  # vLLM's `return_tokens_as_token_ids`: logprobs' "token_id:N"
    continuous_usage: bool = False  # streamed: every chunk with the usage so far
    priority: int = 0  # under the "priority" scheduling policy: lower is served first
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's logprob and the top k
    reasoning: ReasoningParser | None = None  # chat: splits the output's thinking off


def check_model(body: Mapping[str, Any], info: ModelInfo) -> None:
    model = field(body, "model", str)
    if model is not None and model != info.name:
        raise ProtocolError(404, f"The model `{model}` does not exist.", "model")


def check_token_ids(ids: Any, info: ModelInfo, param: str) -> list[int]:
    if not isinstance(ids, list):
        raise bad(f"'{param}' must be an array of token ids", param)
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < info.vocab_size:
            raise bad(f"token id {t!r} in '{param}' is outside [0, {info.vocab_size})", param)
    return ids


def encode(info: ModelInfo, text: str, add_special_tokens: bool, param: str) -> list[int]:
    if info.tokenizer is None:
        raise bad("this model has no tokenizer: send token ids", param)
    return info.tokenizer.encode(text, add_special_tokens=add_special_tokens)


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("'stop' must be a non-empty string or an array of them", "stop")
    return tuple(stops)


def _bad_words(body: Mapping[str, Any]) -> tuple[str, ...]:
    """vLLM's `bad_words`: strings the output may not contain (the engine tokenizes them)."""
    words = field(body, "bad_words", list, [])
    if not all(isinstance(w, str) for w in words):
        raise bad("'bad_words' must be an array of strings", "bad_words")
    return tuple(words)


def _logit_bias(body: Mapping[str, Any], info: ModelInfo) -> dict[int, float]:
    bias = field(body, "logit_bias", dict, {})
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise bad(f"logit_bias key {key!r} is not a token id", "logit_bias") from None
        check_token_ids([token], info, "logit_bias")
        if isinstance(value, bool) or not isinstance(value, int | float) or abs(value) > 100:
            raise bad(f"logit_bias value for {key} must be in [-100, 100]", "logit_bias")
        out[token] = float(value)
    return out


def _sampling_fields(body: Mapping[str, Any], info: ModelInfo) -> dict[str, Any]:
    """Model defaults, overridden by whatever the request sets."""
    out = {k: v for k, v in info.default_params.items() if k in _SAMPLING_FIELDS}
    given = {k: field(body, k, float) for k in _FLOAT_FIELDS}
    given |= {k: field(body, k, int) for k in _INT_FIELDS}
    given |= {k: field(body, k, bool) for k in _BOOL_FIELDS}
    out |= {k: v for k, v in given.items() if v is not None}
    if out.get("n", 1) > info.max_n:
        raise bad(f"'n' must be at most {info.max_n}", "n")
    out["stop"] = _stop(body)
    ids = body.get("stop_token_ids")
    out["stop_token_ids"] = (
        () if ids is None else tuple(check_token_ids(ids, info, "stop_token_ids"))
    )
    out["logit_bias"] = _logit_bias(body, info)
    out["bad_words"] = _bad_words(body)
    allowed = body.get("allowed_token_ids")
    if allowed is not None:
        if allowed == []:
            raise bad("'allowed_token_ids' must not be empty", "allowed_token_ids")
        out["allowed_token_ids"] = check_token_ids(allowed, info, "allowed_token_ids")
    out["structured_outputs"] = structured_outputs(body)
    return out


def _max_tokens(body: Mapping[str, Any]) -> tuple[int | None, str]:
    """The requested completion length and the field that carried it (max_completion_tokens
    over max_tokens; both are read, and type-checked)."""
    given = [(field(body, k, int), k) for k in ("max_completion_tokens", "max_tokens")]
    return next(((v, k) for v, k in given if v is not None), (None, "max_tokens"))


def _prompt(
    ids: list[int],
    text: str | None,
    body: Mapping[str, Any],
    info: ModelInfo,
    sampling: dict[str, Any],
    names: dict[str, str],
    default_max_tokens: int | None = None,
) -> Prompt:
    """One prompt's params; `names` maps SamplingParams fields (and "prompt") to the request's
    field names. Without max_tokens in the request: the model's default, else
    `default_max_tokens`, else (None) as many as fit, each capped at what fits."""
    prompt_param = names.get("prompt", "prompt")
    ids, text = _truncated(ids, text, body, info)
    if len(ids) >= info.max_model_len:
        msg = (
            f"the prompt is {len(ids)} tokens; this model's max_model_len is "
            f"{info.max_model_len}, which leaves no room for a completion token"
        )
        raise bad(msg, prompt_param)
    requested, key = _max_tokens(body)
    room = info.max_model_len - len(ids)
    default = sampling.get("max_tokens", default_max_tokens or room)
    max_tokens = requested if requested is not None else min(default, room)
    try:
        params = SamplingParams(**(sampling | {"max_tokens": max_tokens}))
    except ValueError as exc:
        field = str(exc).removeprefix("invalid ").split(":")[0]
        name = names.get(field, field)
        raise bad(str(exc).replace(field, name, 1), name) from None
    if len(ids) + max_tokens > info.max_model_len:
        raise bad(
            f"this model's max_model_len is {info.max_model_len} tokens, but {len(ids)} prompt "
            f"tokens + {max_tokens} completion tokens ({key}) = {len(ids) + max_tokens}",
            key,
        )
    return Prompt(tuple(ids), text, params)


def _truncated(
    ids: list[int], text: str | None, body: Mapping[str, Any], info: ModelInfo
) -> tuple[list[int], str | None]:
    """vLLM's `truncate_prompt_tokens`: the prompt's last k tokens (-1: max_model_len), its
    text (when it has one) decoded from them."""
    k = field(body, "truncate_prompt_tokens", int)
    if k == -1:
        k = info.max_model_len
    if k is not None and k < 1:
        msg = "'truncate_prompt_tokens' must be at least 1, or -1 (max_model_len)"
        raise bad(msg, "truncate_prompt_tokens")
    if k is None or len(ids) <= k:
        return ids, text
    ids = ids[-k:]
    return ids, info.tokenizer.decode(ids) if text is not None else None


def _stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool, bool]:
    """(stream, include_usage, continuous_usage: every chunk with the usage so far, vLLM's
    `stream_options.continuous_usage_stats`)."""
    stream = field(body, "stream", bool, False)
    options = field(body, "stream_options", dict)
    if options is not None and not stream:
        raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    usage = bool(options and field(options, "include_usage", bool, False))
    continuous = usage and bool(field(options, "continuous_usage_stats", bool, False))
    return stream, usage, continuous


def _request_fields(body: Mapping[str, Any], info: ModelInfo) -> dict[str, Any]:
    """vLLM's fields of a request beside its prompts and sampling: token ids shown,
    priority, prompt logprobs shown; `best_of` > 1 and beam search refused, as vLLM V1
    refuses them; OpenAI's `user` read, and unused."""
    best_of = field(body, "best_of", int)
    if best_of not in (None, 1):
        raise bad("'best_of' is not supported: it must be 1 or null (use 'n')", "best_of")
    if field(body, "use_beam_search", bool, False):
        raise bad("beam search is not supported", "use_beam_search")
    field(body, "user", str)
    priority = field(body, "priority", int, 0)
    if priority and not info.priority_scheduling:
        raise bad("'priority' needs a server started with --scheduling-policy priority", "priority")
    return {
        "return_token_ids": field(body, "return_token_ids", bool, False),
        "tokens_as_ids": field(body, "return_tokens_as_token_ids", bool, False),
        "priority": priority,
        "prompt_logprobs": field(body, "prompt_logprobs", int),
    }


def _prompt_logprobs(k: int | None, body: Mapping[str, Any], sampling: dict[str, Any]) -> None:
    """vLLM's `prompt_logprobs` (`k`, from `_request_fields`): the prompt scored too (with
    echo's scoring, the larger k); whole responses only, as in vLLM."""
    if k is None:
        return
    if field(body, "stream", bool, False):
        raise bad("'prompt_logprobs' cannot be streamed", "prompt_logprobs")
    sampling["prompt_logprobs"] = max(k, sampling.get("prompt_logprobs") or 0)


def _completion_items(body: Mapping[str, Any]) -> list[str | list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt):
            return prompt
        if not any(isinstance(p, str | list) for p in prompt):
            return [prompt]  # one token-id prompt; the ids are checked later
    raise bad("'prompt' must be a string, token ids, or a non-empty array of either", "prompt")


def _completion_prompt(item: str | list[int], info: ModelInfo, special: bool, echo: bool):
    if not item:
        raise bad("'prompt' must not be empty", "prompt")
    if isinstance(item, str):
        return encode(info, item, special, "prompt"), item
    ids = check_token_ids(item, info, "prompt")
    if echo and info.tokenizer is None:
        raise bad("'echo' needs a tokenizer, which this model lacks", "echo")
    return ids, info.tokenizer.decode(ids) if echo else None


@warns_ignored
def parse_completion(body: Mapping[str, Any], info: ModelInfo) -> GenerateRequest:
    check_model(body, info)
    if body.get("suffix") is not None:
        raise bad("'suffix' is not supported", "suffix")
    stream, include_usage, continuous_usage = _stream_flags(body)
    echo = field(body, "echo", bool, False)
    logprobs = field(body, "logprobs", int)
    sampling = _sampling_fields(body, info) | {"logprobs": logprobs}
    if echo:  # the prompt's tokens are listed with logprobs too, as OpenAI and vLLM do
        sampling["prompt_logprobs"] = logprobs
    extra = _request_fields(body, info)
    _prompt_logprobs(extra["prompt_logprobs"], body, sampling)
    requested, key = _max_tokens(body)
    # echo with max_tokens 0 scores the prompt alone: one token is generated, and dropped
    echo_only = echo and requested == 0
    if echo_only:
        if sampling.get("min_tokens", 0) > 0:
            raise bad(f"'min_tokens' must be 0 when '{key}' is 0", "min_tokens")
        body = body | {key: 1}  # (a Fields: what is read of the copy counts as read)
        sampling["logprobs"] = None  # nobody sees the token: nothing to rank it against
    special = field(body, "add_special_tokens", bool, True)
    items = [_completion_prompt(p, info, special, echo) for p in _completion_items(body)]
    prompts = tuple(
        _prompt(ids, text, body, info, sampling, {"max_tokens": key}, COMPLETION_MAX_TOKENS)
        for ids, text in items
    )
    n = prompts[0].params.n
    return GenerateRequest(
        False,
        prompts,
        n,
        stream,
        include_usage,
        echo,
        logprobs,
        echo_only,
        continuous_usage=continuous_usage,
        **extra,
    )


def chat_prompt(
    body: Mapping[str, Any], info: ModelInfo, special_default: bool, tools: list | None = None
) -> list[int]:
    """The token ids of the templated conversation in body['messages'] (with `tools`)."""
    messages = body.get("messages")
    continue_final = field(body, "continue_final_message", bool, False)
    add_generation_prompt = field(body, "add_generation_prompt", bool, not continue_final)
    if continue_final and add_generation_prompt:
        raise bad(
            "'continue_final_message' and 'add_generation_prompt' cannot both be true",
            "continue_final_message",
        )
    template_kwargs = field(body, "chat_template_kwargs", dict, {})
    try:
        parsed = parse_messages(messages)
        if info.tokenizer is None:
            raise ValueError("this model has no tokenizer or chat template")
        text = render_chat(
            info.tokenizer, parsed, add_generation_prompt, tools, continue_final, template_kwargs
        )
    except ValueError as exc:
        raise bad(str(exc), "messages") from None
    special = field(body, "add_special_tokens", bool, special_default)
    return encode(info, text, special, "messages")


def _chat_logprobs(body: Mapping[str, Any]) -> int | None:
    top = field(body, "top_logprobs", int)
    if not field(body, "logprobs", bool, False):
        if top is not None:
            raise bad("'top_logprobs' needs 'logprobs' set to true", "top_logprobs")
        return None
    return top or 0


@warns_ignored
def parse_chat(body: Mapping[str, Any], info: ModelInfo) -> GenerateRequest:
    check_model(body, info)
    stream, include_usage, continuous_usage = _stream_flags(body)
    top_logprobs = _chat_logprobs(body)
    sampling = _sampling_fields(body, info) | {"logprobs": top_logprobs}
    extra = _request_fields(body, info)
    _prompt_logprobs(extra["prompt_logprobs"], body, sampling)
    try:
        tools, tool_choice = parse_tools(body, info.tool_call_parser)
    except ToolsError as exc:
        raise bad(str(exc), exc.param) from None
    auto = tool_choice is not None and not isinstance(tool_choice, ForcedCalls)
    if auto and body.get("skip_special_tokens") is None:
        sampling["skip_special_tokens"] = False  # a model may mark its call tags special
    if isinstance(tool_choice, ForcedCalls):
        if sampling["structured_outputs"] is not None:
            raise bad(
                "a tool_choice that forces calls cannot go with response_format, "
                "structured_outputs or guided_*: it sets the output's form itself",
                "tool_choice",
            )
        sampling["structured_outputs"] = tool_choice.spec()
    ids = chat_prompt(body, info, special_default=False, tools=tools)
    names = {"max_tokens": _max_tokens(body)[1], "logprobs": "top_logprobs", "prompt": "messages"}
    prompt = _prompt(ids, None, body, info, sampling, names)
    n = prompt.params.n
    # a constrained output is all answer: its grammar holds from its first token
    constrained = sampling["structured_outputs"] is not None
    reasoning = None if constrained else REASONING_PARSERS.get(info.reasoning_parser)
    return GenerateRequest(
        True,
        (prompt,),
        n,
        stream,
        include_usage,
        False,
        top_logprobs,
        tool_choice=tool_choice,
        continuous_usage=continuous_usage,
        reasoning=reasoning,
        **extra,
    )
