"""Kiln: compile a Hugging Face decoder once, serve it fast. The public API."""

from kiln.api import LLM, compile
from runtime.outputs import CompletionOutput, RequestOutput
from runtime.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "compile"]
