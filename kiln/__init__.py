"""Kiln: compile a Hugging Face decoder once, serve it fast. The public API."""

from runtime.outputs import CompletionOutput, RequestOutput
from runtime.sampling_params import SamplingParams, StructuredOutputs

__all__ = [
    "LLM",
    "CompletionOutput",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputs",
    "attention",
    "compile",
]


def __getattr__(name: str):
    # imported when first used: torch for LLM and compile, transformers' model code for
    # kiln.attention (custom architectures); `kiln run` starts its engine process first
    if name in ("LLM", "compile"):
        from kiln import api

        return getattr(api, name)
    if name == "attention":
        from compiler.frontend.module import attention

        return attention
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
