"""The cluster model, defined once: the emulated backends (`python -m backends --cluster F`), the
simulator and the proxy's `--cluster-file` all read this schema, so a scenario trained in the
simulator describes exactly the servers the launcher starts; `cluster_to_toml` writes it (the demo's
cluster on free ports).

Schema (TOML)::

    [service]                       # optional; defaults shown
    distribution = "exponential"    # exponential | lognormal | constant
    cv = 1.0                        # coefficient of variation (lognormal only)
    light_ms = 10.0                 # mean service time of each class at speed 1.0
    heavy_ms = 50.0
    static_ms = 2.0

    [[server]]                      # one table per backend, 1..16 of them
    name = "fast"                   # optional; default "s<index>"
    host = "127.0.0.1"              # optional
    port = 8081
    workers = 4                     # concurrent requests served; more wait in a FIFO queue
    speed = 2.0                     # overall speed factor (service time divided by it)
    class_speed = { heavy = 0.25 }  # optional per-class factor on top of `speed`
    error_rate = 0.0                # optional baseline probability of a 500
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lbproxy.observe import MAX_BACKENDS, RequestClass

Distribution = Literal["exponential", "lognormal", "constant"]
CLASS_NAMES = tuple(c.name.lower() for c in RequestClass)


class ClusterSpecError(ValueError):
    """A cluster/scenario file is malformed; the message names the file, the key and the fix."""


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    distribution: Distribution = "exponential"
    cv: float = 1.0
    mean_s: tuple[float, float, float] = (0.010, 0.050, 0.002)
    """Mean service time per class (light, heavy, static) at speed 1.0."""


@dataclass(frozen=True, slots=True)
class ServerSpec:
    name: str
    port: int
    host: str = "127.0.0.1"
    workers: int = 4
    speed: float = 1.0
    class_speed: tuple[float, float, float] = (1.0, 1.0, 1.0)
    error_rate: float = 0.0

    def mean_service_s(self, service: ServiceSpec, req_class: int) -> float:
        return service.mean_s[req_class] / (self.speed * self.class_speed[req_class])

    def capacity_rps(self, service: ServiceSpec, mix: tuple[float, float, float]) -> float:
        """Requests/s this server completes at full utilisation under a class mix."""
        mean = sum(m * self.mean_service_s(service, c) for c, m in enumerate(mix)) / sum(mix)
        return self.workers / mean

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    servers: tuple[ServerSpec, ...]
    service: ServiceSpec = field(default_factory=ServiceSpec)

    def capacity_rps(self, mix: tuple[float, float, float]) -> float:
        return sum(s.capacity_rps(self.service, mix) for s in self.servers)


def _num(table: dict[str, Any], key: str, default: float, where: str, *, positive: bool = True) -> float:
    v = table.get(key, default)
    if not isinstance(v, int | float) or isinstance(v, bool) or (positive and v <= 0) or v < 0:
        raise ClusterSpecError(f"{where}: {key} must be a {'positive ' if positive else ''}number, got {v!r}")
    return float(v)


def cluster_from_dict(data: dict[str, Any], where: str = "cluster", base_port: int = 8081) -> ClusterSpec:
    svc = data.get("service", {})
    dist = svc.get("distribution", "exponential")
    if dist not in ("exponential", "lognormal", "constant"):
        raise ClusterSpecError(
            f"{where}: [service] distribution must be exponential, lognormal or constant, got {dist!r}"
        )
    service = ServiceSpec(
        distribution=dist,
        cv=_num(svc, "cv", 1.0, f"{where} [service]"),
        mean_s=tuple(  # type: ignore[arg-type]
            _num(svc, f"{c}_ms", d * 1000, f"{where} [service]") / 1000.0
            for c, d in zip(CLASS_NAMES, ServiceSpec().mean_s, strict=True)
        ),
    )
    raw = data.get("server", [])
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_BACKENDS:
        raise ClusterSpecError(
            f"{where}: needs 1..{MAX_BACKENDS} [[server]] tables, got {len(raw) if isinstance(raw, list) else raw!r}"
        )
    servers = []
    for i, s in enumerate(raw):
        w = f"{where} [[server]] #{i + 1}"
        unknown = set(s) - {"name", "host", "port", "workers", "speed", "class_speed", "error_rate"}
        if unknown:
            raise ClusterSpecError(f"{w}: unknown key(s) {', '.join(sorted(unknown))}")
        cs = s.get("class_speed", {})
        bad = set(cs) - set(CLASS_NAMES)
        if bad:
            raise ClusterSpecError(f"{w}: class_speed keys must be among {', '.join(CLASS_NAMES)}, got {sorted(bad)}")
        workers = s.get("workers", 4)
        if not isinstance(workers, int) or workers < 1:
            raise ClusterSpecError(f"{w}: workers must be a positive integer, got {workers!r}")
        servers.append(
            ServerSpec(
                name=str(s.get("name", f"s{i}")),
                host=str(s.get("host", "127.0.0.1")),
                port=int(s.get("port", base_port + i)),
                workers=workers,
                speed=_num(s, "speed", 1.0, w),
                class_speed=tuple(_num(cs, c, 1.0, w + " class_speed") for c in CLASS_NAMES),  # type: ignore[arg-type]
                error_rate=_num(s, "error_rate", 0.0, w, positive=False),
            )
        )
    return ClusterSpec(servers=tuple(servers), service=service)


def load_cluster(path: Path) -> ClusterSpec:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ClusterSpecError(f"cluster file {str(path)!r} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ClusterSpecError(f"{path}: not valid TOML: {exc}") from None
    return cluster_from_dict(data, where=str(path))


def _toml_number(x: float) -> str:
    """Short where that is exact (`speed = 2`, `heavy = 0.25`), otherwise every digit, so a written
    cluster loads back as the same numbers."""
    short = f"{x:g}"
    return short if float(short) == x else repr(float(x))


def cluster_to_toml(spec: ClusterSpec, comment: str = "") -> str:
    """The cluster as a file of the schema above (every key written out), which `load_cluster` reads
    back as `spec`; `comment` becomes a first line `# comment`. The demo writes its cluster with it
    (free ports), for the launcher, the proxy's `--cluster-file` and the user to read."""
    svc = spec.service
    lines = [f"# {comment}"] if comment else []
    lines += [
        "[service]",
        f"distribution = {json.dumps(svc.distribution)}",
        f"cv = {_toml_number(svc.cv)}",
        *(f"{c}_ms = {_toml_number(m * 1000)}" for c, m in zip(CLASS_NAMES, svc.mean_s, strict=True)),
    ]
    for s in spec.servers:
        # json.dumps: a JSON string with its escapes is a valid TOML basic string.
        class_speed = ", ".join(f"{c} = {_toml_number(v)}" for c, v in zip(CLASS_NAMES, s.class_speed, strict=True))
        lines += [
            "",
            "[[server]]",
            f"name = {json.dumps(s.name)}",
            f"host = {json.dumps(s.host)}",
            f"port = {s.port}",
            f"workers = {s.workers}",
            f"speed = {_toml_number(s.speed)}",
            f"class_speed = {{ {class_speed} }}",
            f"error_rate = {_toml_number(s.error_rate)}",
        ]
    return "\n".join(lines) + "\n"
