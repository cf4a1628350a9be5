"""Discrete-event simulator of the cluster model (lbproxy/cluster.py) and its scenario files.

Trains and evaluates any Policy thousands of times faster than real HTTP, with the same features,
reward and metrics (lbproxy/observe/) as the live proxy. See engine.py for the model and the
event order, scenario.py (or SCENARIOS.md) for the scenario file schema.
"""

from __future__ import annotations

from lbproxy.sim.engine import CONNECT_FAIL_S, EpisodeResult, Simulator
from lbproxy.sim.oracle import SedOracle
from lbproxy.sim.scenario import Fault, Scenario, ScenarioError, Surge, list_scenarios, load_scenario

__all__ = [
    "CONNECT_FAIL_S",
    "EpisodeResult",
    "Fault",
    "Scenario",
    "ScenarioError",
    "SedOracle",
    "Simulator",
    "Surge",
    "list_scenarios",
    "load_scenario",
]
