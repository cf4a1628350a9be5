"""Request classes by path: the emulated backends, the simulator and the proxy use the same three."""

from __future__ import annotations

from enum import IntEnum


class RequestClass(IntEnum):
    """Request classes by path; the emulated backends and the simulator use the same three."""

    LIGHT = 0
    HEAVY = 1
    STATIC = 2


NUM_CLASSES = len(RequestClass)


def classify_path(path: str) -> RequestClass:
    """Map a request path to its class. Anything not recognisably heavy or static counts as light."""
    if path.startswith("/static/"):
        return RequestClass.STATIC
    if path.startswith("/api/heavy"):
        return RequestClass.HEAVY
    return RequestClass.LIGHT
