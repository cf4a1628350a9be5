"""The value types of Settings fields (lbproxy/config.py) that are more than a bare number or string:
shares in %, ports, the backend list (`URL[=WEIGHT],...`) and the worker count (`N` or `auto`), each
with its parsing and bounds."""

from __future__ import annotations

import os
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, field_validator, model_validator

from lbproxy.observe import MAX_BACKENDS

Percent = Annotated[float, Field(ge=0, le=100)]
"""A share in percent."""
Port = Annotated[int, Field(ge=0, le=65535)]
"""A TCP port; 0 = any free one."""


class BackendSpec(BaseModel):
    """One upstream: its base URL and relative capacity (weight)."""

    url: str
    weight: float = Field(default=1.0, gt=0)
    name: str = ""

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http",) or not parts.hostname or (parts.port is None and ":" in parts.netloc):
            raise ValueError(f"malformed backend URL {v!r}: expected http://HOST:PORT")
        if not parts.hostname:
            raise ValueError(f"malformed backend URL {v!r}: expected http://HOST:PORT")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"malformed backend URL {v!r}: {exc}") from None
        return v.rstrip("/")

    @model_validator(mode="after")
    def _default_name(self) -> BackendSpec:
        if not self.name:
            p = urlsplit(self.url)
            self.name = f"{p.hostname}:{p.port or 80}"
        return self


def parse_backends(value: Any) -> list[BackendSpec]:
    """Accepts `URL[=WEIGHT][,URL[=WEIGHT]...]`, a list of such strings, or a list of tables
    (`{url = "...", weight = 2}`) as written in TOML."""
    if value is None or value == "":
        return []
    items: list[Any] = value.split(",") if isinstance(value, str) else list(value)
    out: list[BackendSpec] = []
    for item in items:
        if isinstance(item, BackendSpec):
            out.append(item)
        elif isinstance(item, dict):
            out.append(BackendSpec(**item))
        else:
            text = str(item).strip()
            if not text:
                continue
            url, sep, weight = text.rpartition("=")
            if sep and weight.replace(".", "", 1).isdigit():
                out.append(BackendSpec(url=url, weight=float(weight)))
            else:
                out.append(BackendSpec(url=text))
    return out


def _check_backend_count(v: list[BackendSpec]) -> list[BackendSpec]:
    if len(v) > MAX_BACKENDS:
        raise ValueError(f"at most {MAX_BACKENDS} backends are supported, got {len(v)}")
    return v


BackendList = Annotated[list[BackendSpec], BeforeValidator(parse_backends), AfterValidator(_check_backend_count)]
"""`--backends`: at most MAX_BACKENDS upstreams, as :func:`parse_backends` reads them."""


MAX_WORKERS = 256
"""Most proxy worker processes: beyond the cores of any one host this project targets, a value is a typo."""


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parse_workers(value: Any) -> int:
    """`--workers`: a whole number 1..MAX_WORKERS or `auto` (:func:`usable_cpus`); ValueError otherwise."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return min(usable_cpus(), MAX_WORKERS)
        value = int(text) if text.isdigit() else text
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ValueError(f"must be a whole number from 1 to {MAX_WORKERS} or auto, got {value!r}")
    return value


WorkerCount = Annotated[int, BeforeValidator(parse_workers)]
"""`--workers`: a whole number 1..MAX_WORKERS or `auto`."""
