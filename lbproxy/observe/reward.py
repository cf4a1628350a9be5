"""The reward definition: what the DQN learns to maximise, the same in the simulator and live.

`WindowStats` (metrics.py) sums it per window; rl/reward_join.py attaches it to live transitions.
"""

from __future__ import annotations

ERROR_PENALTY = 50.0
"""Reward penalty for an error or timeout, in typical latencies (an error costs as much as a response
50 times slower than usual): large enough that the agent never prefers a failing backend for speed,
including a crashed one that refuses connections in a millisecond."""


def reward(latency_s: float, error: bool, typical_s: float, error_penalty: float = ERROR_PENALTY) -> float:
    """r = -latency / typical latency - error_penalty * [error or timeout].

    The unit is the cluster's own typical service time (`ClusterView.typical_all_s`), so the reward
    means the same on a 5 ms and a 500 ms application: "how many typical requests long did this one
    take". Latency is end-to-end at the proxy (queueing included), so the agent pays for sending work
    to a backend that is already busy. Gini and accuracy are measured, not rewarded: rewarding
    fairness would fight the latency objective on heterogeneous clusters.
    """
    return -latency_s / max(typical_s, 1e-9) - (error_penalty if error else 0.0)
