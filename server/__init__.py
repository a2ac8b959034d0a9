"""Kiln's OpenAI-compatible HTTP server (aiohttp)."""

__all__ = ["ServerConfig", "create_app", "serve"]


def __getattr__(name: str):
    """The server's API from server.app, imported at first use: the `kiln` command reads
    server.tools without loading aiohttp."""
    if name in __all__:
        from server import app

        return getattr(app, name)
    raise AttributeError(f"module 'server' has no attribute {name!r}")
