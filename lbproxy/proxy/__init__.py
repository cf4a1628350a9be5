"""The data plane: `ProxyServer` (listeners + pool + session), the forwarding handler, header rules,
admin endpoints and the per-window quality gauges."""

from __future__ import annotations

from lbproxy.proxy.app import ProxyServer

__all__ = ["ProxyServer"]
