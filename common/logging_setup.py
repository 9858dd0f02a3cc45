"""Logging configured once, at the entry points (CLIs, experiments); modules only call getLogger(__name__)."""

from __future__ import annotations

import logging
import pathlib


def setup_logging(level: str = "INFO", file: pathlib.Path | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(file))
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=handlers,
        force=True,
    )
