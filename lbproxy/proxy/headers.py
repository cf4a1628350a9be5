"""Header rules of a reverse proxy, precomputed once so the hot path only does set lookups.

RFC 9110 §7.6.1: hop-by-hop fields (and any field named in `Connection`) are meaningful only on one
connection and must not be forwarded. §7.6.3: every proxy appends itself to `Via`. The de-facto
`X-Forwarded-*` fields tell the backend who the client was (nginx's `$proxy_add_x_forwarded_for`).
"""

from __future__ import annotations

from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy, istr

HOP_BY_HOP: frozenset[str] = frozenset(
    istr(h).lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Proxy-Authenticate",
        "Proxy-Authorization",
    )
)
"""RFC 9110 §7.6.1 (plus the non-standard but widespread Proxy-Connection), lower-cased."""

VIA_VALUE = "1.1 lbproxy"
X_FORWARDED_FOR = istr("X-Forwarded-For")
X_FORWARDED_HOST = istr("X-Forwarded-Host")
X_FORWARDED_PROTO = istr("X-Forwarded-Proto")

UPSTREAM_SKIP_AUTO_HEADERS = (hdrs.USER_AGENT, hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.CONTENT_TYPE)
"""aiohttp's client adds these when absent; a proxy must forward the client's headers, not invent some."""


def _connection_named(value: str) -> set[str]:
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def forwarded_items(
    incoming: CIMultiDictProxy[str],
    peer_ip: str | None,
    proto: str,
    host_override: str | None = None,
) -> list[tuple[str, str]]:
    """The request header rules, once: hop-by-hop stripped, X-Forwarded-* and Via added, Host kept
    (or replaced by an absolute-form target's authority). Order of the client's fields is kept."""
    out: list[tuple[str, str]] = []
    conn = incoming.get(hdrs.CONNECTION)
    drop = HOP_BY_HOP | _connection_named(conn) if conn else HOP_BY_HOP
    xff: str | None = None
    via: str | None = None
    host: str | None = host_override
    xfh = xfp = False
    for k, v in incoming.items():
        lk = k.lower()
        if lk in drop:
            continue
        if lk == "host":
            if host is None:
                host = v
            continue
        if lk == "x-forwarded-for":
            xff = v if xff is None else f"{xff}, {v}"  # several fields fold into one list (RFC 9110 §5.3)
            continue
        if lk == "via":
            via = v if via is None else f"{via}, {v}"
            continue
        if lk == "x-forwarded-host":
            xfh = True
        elif lk == "x-forwarded-proto":
            xfp = True
        out.append((k, v))
    if host is not None:
        out.append(("Host", host))
        if not xfh:
            out.append(("X-Forwarded-Host", host))
    if peer_ip:
        out.append(("X-Forwarded-For", f"{xff}, {peer_ip}" if xff else peer_ip))
    elif xff:
        out.append(("X-Forwarded-For", xff))
    if not xfp:
        out.append(("X-Forwarded-Proto", proto))
    out.append(("Via", f"{via}, {VIA_VALUE}" if via else VIA_VALUE))
    return out


def request_headers(
    incoming: CIMultiDictProxy[str],
    peer_ip: str | None,
    proto: str,
    host_override: str | None = None,
) -> CIMultiDict[str]:
    """Headers to send upstream through aiohttp's client (requests with a body)."""
    return CIMultiDict(forwarded_items(incoming, peer_ip, proto, host_override))


def request_head(method: str, target: str, items: list[tuple[str, str]], default_host: str) -> bytes:
    """The serialized request head for the lean upstream client. Field values come from aiohttp's
    parser (no CR/LF possible), the target from the request line (no spaces possible)."""
    lines = [f"{method} {target} HTTP/1.1"]
    lines.extend(f"{k}: {v}" for k, v in items)
    if not any(k == "Host" for k, _ in items):
        lines.append(f"Host: {default_host}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape")


def response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Headers to send back to the client: hop-by-hop stripped, Via appended; the rest untouched
    (Content-Encoding and Content-Length pass through: the body is relayed byte for byte)."""
    out: CIMultiDict[str] = CIMultiDict()
    conn = upstream.get(hdrs.CONNECTION)
    drop = HOP_BY_HOP | _connection_named(conn) if conn else HOP_BY_HOP
    via: str | None = None
    for k, v in upstream.items():
        lk = k.lower()
        if lk in drop:
            continue
        if lk == "via":
            via = v if via is None else f"{via}, {v}"
            continue
        out.add(k, v)
    out[hdrs.VIA] = f"{via}, {VIA_VALUE}" if via else VIA_VALUE
    return out
