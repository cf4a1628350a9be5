"""`lbproxy demo`: the one-command local run (no Docker) — watch the DQN learn on live HTTP, then see
how it compares with the heuristics on the same load.

1. starts the heterogeneous emulated cluster of the default scenario (curriculum.toml) on free ports;
2. runs the proxy in live train mode (dqn, initialised from the shipped general model when
   there is one) while Locust plays phases 1–3 (loadgen/phases.py), printing a progress line every few
   seconds (phase, requests/s, p99, reward, ε) read from the proxy's /metrics;
3. replays the same Locust shape and seed against the proxy serving the learned model greedily and
   against round_robin, least_conn, p2c and peak_ewma, one after the other;
4. writes RUN_DIR/report.md (table + charts) and prints where.

Everything it starts runs in its own process group and is stopped on exit, on Ctrl-C and on SIGTERM.

Modules, in the order a run uses them:

- `cli`: the command line (`lbproxy demo`, `python -m lbproxy.demo`), exit codes, Ctrl-C/SIGTERM;
- `plan`: what one run does (durations, seed, the scenario, the policies compared);
- `stages`: the stages above — cluster, live training, comparison — and the proxies they start;
- `processes`: starting, waiting for and stopping child processes (each in its own process group);
- `locust_runs`: Locust with the phase shape, and its CSV summary;
- `metrics`: the proxy's /metrics read for the progress lines and the traffic shares;
- `report`: report.md and the comparison chart.
"""

from __future__ import annotations

from lbproxy.demo.cli import main

__all__ = ["main"]
