"""Frontend: load a Hugging Face decoder, trace it with torch.export, convert to Kiln IR."""

from compiler.frontend.loader import LoadedModel, UnsupportedModelError, load_model
from compiler.frontend.trace import trace_model

__all__ = ["LoadedModel", "UnsupportedModelError", "load_model", "trace_model"]
