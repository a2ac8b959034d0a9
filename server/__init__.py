"""Kiln's OpenAI-compatible HTTP server (aiohttp)."""

from server.app import ServerConfig, create_app, serve

__all__ = ["ServerConfig", "create_app", "serve"]
