"""State features, the reward, Gini and decision accuracy: the ONE implementation shared by the live
proxy and the simulator.

Sim-to-live transfer depends on both sides computing features and rewards with exactly this code,
so neither the proxy nor the simulator keeps per-backend statistics of its own: they drive a
:class:`ClusterView` through :meth:`ClusterView.on_dispatch` / :meth:`ClusterView.on_complete` and
read everything else from here.

A backend is known by how it behaves, never by its slot (DESIGN.md §4): the DQN's state is one row
of behavioural features per backend (:func:`encode_state`) plus a small context, every latency in
units of the cluster's own typical latency, so the same weights route a cluster of any size, in any
order, at any latency scale. Measured 2026-12-01: a flat slot-indexed state learned "slot 2 is fast"
and was 1.8-7x worse than least_conn off its training cluster.

Where each piece lives (everything is imported from ``lbproxy.observe``):
- request_class.py: the request classes and `classify_path`;
- view.py: `ClusterView` (per-backend statistics, `on_dispatch` / `on_complete`), `Outcome`, and the
  smoothing defaults;
- features.py: the state encoding (`encode_state`, the F_* / C_* columns, `action_mask`) and
  `DispatchModel`;
- reward.py: `reward()`, the reward definition;
- metrics.py: Gini, SED accuracy (`is_accurate`), percentiles and `WindowStats`.
"""

from __future__ import annotations

from lbproxy.observe.features import (
    C_CLASS,
    C_LOAD,
    C_LOG_COUNT,
    C_LOG_SCALE,
    C_LOG_TOTAL,
    CLIP_RATIO,
    CONTEXT_FEATURES,
    F_AVAILABLE,
    F_CONFIDENCE,
    F_ERROR,
    F_EXPECTED,
    F_FAILING,
    F_IDLE,
    F_LATENCY,
    F_LATENCY_ALL,
    F_LOG_CONCURRENCY,
    F_LOG_IN_FLIGHT,
    F_SERVICE,
    F_SHARE,
    F_UTILISATION,
    F_VALID,
    LEARNING_WIDTH_MIN,
    LOOP_ENCODE_MAX,
    ROW_FEATURES,
    STATIC_CONTEXT,
    STATIC_FEATURES,
    DispatchModel,
    action_mask,
    dynamic_columns,
    encode_state,
    feature_dim,
    learning_width,
    state_width,
)
from lbproxy.observe.metrics import (
    WindowStats,
    WindowSummary,
    gini,
    is_accurate,
    percentile,
    sed_choices,
)
from lbproxy.observe.request_class import (
    NUM_CLASSES,
    RequestClass,
    classify_path,
)
from lbproxy.observe.reward import (
    ERROR_PENALTY,
    reward,
)
from lbproxy.observe.view import (
    CONCURRENCY_FALL,
    CONCURRENCY_RISE,
    DEFAULT_RTT_S,
    ERROR_EWMA_ALPHA,
    LATENCY_EWMA_ALPHA,
    MAX_BACKENDS,
    PEAK_EWMA_TAU_S,
    SHARE_DECAY,
    TYPICAL_EWMA_ALPHA,
    ClusterView,
    Outcome,
)

__all__ = [
    "CLIP_RATIO",
    "CONCURRENCY_FALL",
    "CONCURRENCY_RISE",
    "CONTEXT_FEATURES",
    "C_CLASS",
    "C_LOAD",
    "C_LOG_COUNT",
    "C_LOG_SCALE",
    "C_LOG_TOTAL",
    "DEFAULT_RTT_S",
    "ERROR_EWMA_ALPHA",
    "ERROR_PENALTY",
    "F_AVAILABLE",
    "F_CONFIDENCE",
    "F_ERROR",
    "F_EXPECTED",
    "F_FAILING",
    "F_IDLE",
    "F_LATENCY",
    "F_LATENCY_ALL",
    "F_LOG_CONCURRENCY",
    "F_LOG_IN_FLIGHT",
    "F_SERVICE",
    "F_SHARE",
    "F_UTILISATION",
    "F_VALID",
    "LATENCY_EWMA_ALPHA",
    "LEARNING_WIDTH_MIN",
    "LOOP_ENCODE_MAX",
    "MAX_BACKENDS",
    "NUM_CLASSES",
    "PEAK_EWMA_TAU_S",
    "ROW_FEATURES",
    "SHARE_DECAY",
    "STATIC_CONTEXT",
    "STATIC_FEATURES",
    "TYPICAL_EWMA_ALPHA",
    "ClusterView",
    "DispatchModel",
    "Outcome",
    "RequestClass",
    "WindowStats",
    "WindowSummary",
    "action_mask",
    "classify_path",
    "dynamic_columns",
    "encode_state",
    "feature_dim",
    "gini",
    "is_accurate",
    "learning_width",
    "percentile",
    "reward",
    "sed_choices",
    "state_width",
]
