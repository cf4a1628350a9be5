"""Emulated web-application backends for lbproxy: one aiohttp server per process (backends/app.py),
fault injection (backends/faults.py) and a cluster launcher (backends/launcher.py).

Imports from lbproxy are limited to lbproxy/observe/ and lbproxy/cluster.py (numpy only), so the
container image (backends/Dockerfile) needs neither torch nor the rest of the package.
"""
