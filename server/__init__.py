"""Kiln's OpenAI-compatible HTTP server (aiohttp)."""

__all__ = ["ServerConfig", "create_app", "serve"]
_HOME = {"ServerConfig": "app", "create_app": "app", "serve": "lifecycle"}


def __getattr__(name: str):
    """The server's API from server.app and server.lifecycle, imported at first use: the
    `kiln` command reads server.tools without loading aiohttp."""
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f"server.{_HOME[name]}"), name)
    raise AttributeError(f"module 'server' has no attribute {name!r}")
