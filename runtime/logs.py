"""Logging as the `kiln` command sets it up, in its process and in the engine's."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOISY = ("torch", "transformers", "httpx", "numba")


def configure_logging(level: int) -> None:
    logging.basicConfig(level=level, format=FORMAT)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
