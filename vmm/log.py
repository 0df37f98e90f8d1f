"""Loggers for pyvmm's modules that import :mod:`logging` only when first used.

Importing ``logging`` costs several milliseconds of start-up (it pulls in traceback,
string, weakref...), and a VM that runs without incident never logs anything; so the
modules on the start-up path get their logger from here.
"""

from __future__ import annotations


class LazyLogger:
    """Stands for ``logging.getLogger(name)``; the real logger is made on first use."""

    __slots__ = ("_name", "_logger")

    def __init__(self, name: str):
        self._name = name
        self._logger = None

    def __getattr__(self, attr):
        if self._logger is None:
            import logging
            self._logger = logging.getLogger(self._name)
        return getattr(self._logger, attr)


def get_logger(name: str) -> LazyLogger:
    return LazyLogger(name)


def log_once(logger, seen: set, key, msg: str, *args) -> None:
    """``logger.warning(msg, *args)`` the first time ``key`` is seen (``seen`` records it).

    For what a guest can cause over and over (a malformed request, an unknown register):
    one line per kind of mistake, not a flood.
    """
    if key not in seen:
        seen.add(key)
        logger.warning(msg, *args)
