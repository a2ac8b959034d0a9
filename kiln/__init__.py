"""Kiln: compile a Hugging Face decoder once, serve it fast. The public API."""

from kiln.api import LLM, compile
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
    # kiln.attention, for custom architectures, lives with the compiler, whose imports
    # (transformers' model code) would add seconds to every `import kiln`
    if name == "attention":
        from compiler.frontend.module import attention

        return attention
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
