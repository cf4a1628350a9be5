"""Settings: one pydantic-settings model, filled from (highest first) CLI flags, `LBPROXY_*`
environment variables, an optional TOML file (`--config` / `LBPROXY_CONFIG`), then defaults.

The model is flat on purpose: every field is a CLI flag (`--field-name`), an environment variable
(`LBPROXY_FIELD_NAME`) and a TOML key (`field_name`), with the same name everywhere. The CLI's
`--help` and the README's configuration reference are generated from the field descriptions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from lbproxy.config_values import BackendList, BackendSpec, Percent, Port, WorkerCount
from lbproxy.observe import ERROR_PENALTY
from lbproxy.outlier import (
    LATENCY_EJECT_COMPLETIONS,
    LATENCY_EJECT_FACTOR,
    LATENCY_EJECT_MIN_BACKENDS,
    LATENCY_EJECT_MIN_SAMPLES,
    SLOW_START_AGGRESSION,
    SLOW_START_MIN_WEIGHT_PERCENT,
    SLOW_START_WINDOW_S,
)
from lbproxy.retry import PER_TRY_TIMEOUT_S, RETRY_BUDGET_PERCENT, RETRY_MIN_CONCURRENCY

POLICY_NAMES = ("round_robin", "random", "least_conn", "p2c", "peak_ewma", "sed", "prequal", "c3", "dqn")


class ConfigError(Exception):
    """A user mistake in configuration: reported as one line, exit code 2, never a traceback."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LBPROXY_", extra="forbid", validate_default=True)

    # --- what to run -------------------------------------------------------------------------------
    mode: Literal["serve", "train", "evaluate"] = Field(
        "serve",
        description="What to run: serve live "
        "traffic, train the DQN (live or in the simulator), or evaluate a model against every heuristic.",
    )
    config: Path | None = Field(None, description="TOML file with any of these settings (keys as below).")
    policy: str = Field("round_robin", description=f"Balancing policy: {', '.join(POLICY_NAMES)}.")
    seed: int = Field(0, description="Random seed for policies, exploration, simulator and training.")

    # --- data plane --------------------------------------------------------------------------------
    backends: BackendList = Field(
        default_factory=list,
        description="Upstreams as URL[=WEIGHT][,URL[=WEIGHT]...], e.g. http://127.0.0.1:8081,http://127.0.0.1:8082=2.",
    )
    cluster_file: Path | None = Field(
        None,
        description="Cluster TOML (as for `python -m backends "
        "--cluster`); its servers become the backends, their workers x speed the weights.",
    )
    host: str = Field("0.0.0.0", description="Address the proxy listens on.")
    port: Port = Field(8080, description="Port the proxy listens on.")
    workers: WorkerCount = Field(
        1,
        description="Proxy processes accepting on the one port (SO_REUSEPORT), each with its own event loop, "
        "pool view and inline inference; `auto` = the CPUs this process may run on. Above 1, a supervisor "
        "restarts workers that die and owns the one admin listener (lbproxy/workers.py); with --online every "
        "worker feeds one learner process, and live training (--mode train) runs the same way, its run kept by the "
        "supervisor.",
    )
    admin_host: str = Field(
        "127.0.0.1",
        description="Address of the admin listener (/metrics, /healthz, "
        "/readyz, /admin/...); loopback only by default. Any other address needs an admin token.",
    )
    admin_port: Port = Field(9180, description="Port of the admin listener.")
    # Never printed or dumped (repr=False, exclude=True); read by lbproxy/proxy/admin.py.
    admin_token: str | None = Field(
        None,
        repr=False,
        exclude=True,
        description="Bearer token that state-changing admin requests (POST/DELETE) must send as "
        "`Authorization: Bearer TOKEN`; required when --admin-host is not loopback. At least 16 characters. "
        "A flag shows in `ps`: prefer the environment or --admin-token-file.",
    )
    admin_token_file: Path | None = Field(
        None,
        description="File whose first line is the admin token (e.g. a Docker or Kubernetes secret); "
        "instead of --admin-token.",
    )
    connect_timeout_s: float = Field(2.0, gt=0, description="Upstream connect timeout (s).")
    read_timeout_s: float = Field(30.0, gt=0, description="Upstream time to first byte / between reads (s).")
    total_timeout_s: float = Field(60.0, gt=0, description="Upstream total request timeout (s); 504 past it.")
    retry: bool = Field(
        True,
        description="Retry idempotent requests without a body once on another backend after a connect "
        "error, a stale keep-alive disconnect, a 5xx response or a per-try timeout, within the retry budget.",
    )
    access_log: bool = Field(False, description="Log every request (costs ~10% throughput).")
    client_header_timeout_s: float = Field(
        20.0,
        ge=0,
        description="Time a client has to send a complete request head, from connecting or from its first "
        "byte after a keep-alive idle (s); 408 and close past it (slowloris). 0 disables. Apache "
        "mod_reqtimeout's header=20; nginx client_header_timeout is 60.",
    )
    client_body_timeout_s: float = Field(
        60.0,
        ge=0,
        description="Longest pause between two reads of a request body (s); 408 past it (nginx "
        "client_body_timeout). 0 disables.",
    )
    max_body_bytes: int = Field(
        1 << 30,
        ge=0,
        description="Largest request body accepted (bytes); 413 past it, without buffering it (nginx "
        "client_max_body_size; ours defaults to 1 GiB, since bodies stream). 0 = no limit.",
    )
    health_interval_s: float = Field(
        2.0, ge=0, description="Active health check interval (s), when --health-path is set; 0 disables."
    )
    health_path: str = Field(
        "",
        description="Path probed by active health checks (e.g. /health); empty (the default) = no active "
        "checks: backends are judged by their answers (outlier ejection), as in Envoy and HAProxy, "
        "since most web apps serve no health path and would all be marked down.",
    )
    health_rise: int = Field(2, ge=1, description="Consecutive passing checks that mark a backend healthy.")
    health_fall: int = Field(3, ge=1, description="Consecutive failing checks that mark a backend unhealthy.")
    eject_consecutive_failures: int = Field(
        5,
        ge=1,
        description="Consecutive 5xx/connect failures that eject a backend (Envoy outlier detection default: 5).",
    )
    eject_base_s: float = Field(
        30.0,
        gt=0,
        description="Base ejection time (s), multiplied by the number of "
        "times the backend was ejected (Envoy default: 30 s).",
    )
    max_ejection_percent: Percent = Field(50.0, description="Never eject more than this share of backends.")
    panic_threshold_percent: Percent = Field(
        50.0,
        description="Below this share of available backends, route to all of them (Envoy's panic mode, default 50%).",
    )
    # Latency ejection, slow start and retry limits: rules, defaults and sources in lbproxy/outlier.py
    # and lbproxy/retry.py.
    latency_eject_factor: float = Field(
        LATENCY_EJECT_FACTOR,
        ge=0,
        description="Eject a backend whose latency for a request class stays above this multiple of the median "
        "of the available backends' (a latency outlier, ejected like one that errors); 0 disables.",
    )
    latency_eject_completions: int = Field(
        LATENCY_EJECT_COMPLETIONS, ge=1, description="Completions in a row above that before a latency ejection."
    )
    latency_eject_min_samples: int = Field(
        LATENCY_EJECT_MIN_SAMPLES,
        ge=1,
        description="Completions of a class since a backend was (re)admitted before its latency is judged or "
        "counts in the median.",
    )
    latency_eject_min_backends: int = Field(
        LATENCY_EJECT_MIN_BACKENDS,
        ge=2,
        description="Available backends (with enough samples) needed to judge latency outliers.",
    )
    slow_start_window_s: float = Field(
        SLOW_START_WINDOW_S,
        ge=0,
        description="Slow start: a backend added at runtime or recovered by active health checks ramps up to "
        "its full share of requests over this many seconds, for every policy (Envoy slow_start_config, whose "
        "default 0 is off); 0 disables.",
    )
    slow_start_aggression: float = Field(
        SLOW_START_AGGRESSION,
        gt=0,
        description="Slow-start ramp: share = max(min weight, (t / window) ^ (1 / aggression)); 1 = linear "
        "(Envoy default).",
    )
    slow_start_min_weight_percent: Percent = Field(
        SLOW_START_MIN_WEIGHT_PERCENT,
        description="Share a slow-starting backend starts at, in % of its fair share (Envoy default: 10).",
    )
    retry_budget_percent: Percent = Field(
        RETRY_BUDGET_PERCENT,
        description="Retry budget: concurrent retries stay within this share of active requests, so retries "
        "cannot multiply an outage (Envoy retry_budget default: 20%).",
    )
    retry_min_concurrency: int = Field(
        RETRY_MIN_CONCURRENCY,
        ge=0,
        description="Concurrent retries allowed whatever the budget (Envoy min_retry_concurrency default: 3).",
    )
    per_try_timeout_s: float = Field(
        PER_TRY_TIMEOUT_S,
        ge=0,
        description="How long a first try that could be retried waits for the response head before it is "
        "abandoned and retried on another backend (s; Envoy per_try_timeout); a hung backend then costs this, "
        "not --read-timeout-s. Only when the retry budget and another backend allow a retry; 0 disables.",
    )

    # --- learning ----------------------------------------------------------------------------------
    env: Literal["auto", "live", "sim"] = Field(
        "auto",
        description="Training environment: live HTTP traffic "
        "or the simulator; auto = live when backends are configured, else sim.",
    )
    scenario: str | None = Field(
        None,
        description="Simulator scenario: a shipped name (see `lbproxy "
        "--list-scenarios`), a TOML file path, or `generated` (a new random cluster every episode: the "
        "general model's training distribution). Default: the three-phase curriculum cluster.",
    )
    episodes: int | None = Field(
        None, ge=1, description="Episodes to run (train default 6000; evaluate 50, or 32 per cluster with --suite)."
    )
    suite: str | None = Field(
        None,
        description="Evaluate on a suite of clusters instead of one scenario: evaluation:N (N held-out generated "
        "clusters), validation:N (clusters to tune on), shipped (every shipped scenario), joined by '+', e.g. "
        "evaluation:200+shipped.",
    )
    jobs: int = Field(1, ge=1, description="Worker processes for --suite evaluation.")
    episode_decisions: int = Field(256, ge=1, description="Routed decisions per episode.")
    run_dir: Path = Field(Path("runs/default"), description="Where checkpoints/, metrics/ and reports go.")
    resume: bool = Field(False, description="Continue training from the newest checkpoint in run_dir.")
    init_model: Path | None = Field(None, description="Start live training from this (simulator-trained) model.")
    model: Path | None = Field(None, description="DQN model to serve or evaluate (default: the shipped model).")
    online: bool = Field(False, description="In serve mode, keep learning from live traffic.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where inference and learning run. auto: learning on a GPU when there is one, live "
        "inference inline on the CPU (cheaper for the event loop at this model size); cuda: both on the GPU.",
    )
    checkpoint_every: int = Field(100, ge=1, description="Save a checkpoint every N episodes.")
    keep_checkpoints: int = Field(
        3,
        ge=0,
        description="Keep only the newest N training checkpoints (0 = all); each holds the replay buffer "
        "(~70 MB at the default buffer size).",
    )
    metrics_every: int = Field(10, ge=1, description="Write a metrics CSV row every N episodes.")
    gamma: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Discount; small because routing is nearly a bandit, not 0: a choice also sets the queue "
        "the next requests meet (0.5 beat 0 on the validation clusters; 0 skips the bootstrap).",
    )
    lr: float = Field(1e-3, gt=0, description="Adam learning rate.")
    batch_size: int = Field(128, ge=1, description="Learner minibatch size.")
    buffer_size: int = Field(100_000, ge=1, description="Replay buffer capacity (transitions).")
    learning_starts: int = Field(1000, ge=0, description="Transitions collected before the first update.")
    updates_per_decision: float = Field(0.1, gt=0, description="Learner updates per routed decision.")
    target_update_every: int = Field(500, ge=1, description="Updates between target-network syncs.")
    weight_sync_every: int = Field(50, ge=1, description="Updates between publishing weights to inference.")
    eps_start: float = Field(1.0, ge=0, le=1, description="Initial exploration rate.")
    eps_end: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Final exploration rate (training), and the share of requests routed by the fallback "
        "for learning when serving with --online, the guardrail's control arm included (so ε there is "
        "eps-end minus control-share, 0 at the defaults).",
    )
    eps_fraction: float = Field(0.3, gt=0, le=1, description="Share of training over which epsilon decays.")
    hidden: int = Field(64, ge=4, description="Hidden width of the Q-network's per-backend rows.")
    grad_clip: float = Field(10.0, gt=0, description="Gradient-norm clip.")
    error_penalty: float = Field(
        ERROR_PENALTY,
        ge=0,
        description="Reward penalty for an error or timeout, in typical latencies of the cluster (the "
        "reward's unit: latency / the cluster's typical service time).",
    )
    decision_deadline_us: float = Field(
        500.0, gt=0, description="Max DQN decision wait before falling back to peak_ewma (µs)."
    )
    control_share: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Guardrail: share of requests routed by the fallback heuristic (peak_ewma) as a control "
        "arm; when the DQN arm is worse with statistical confidence, everything is routed by the fallback "
        "until it recovers (lbproxy/guardrail.py). 0 disables the guardrail.",
    )
    max_batch: int = Field(
        256,
        ge=1,
        description="Max decisions per inference forward pass (CPU: one loop iteration's decisions share a "
        "pass up to this many).",
    )
    learner_process: bool = Field(
        False,
        description="Run live learner updates in a separate process (shared-memory replay) instead of a "
        "thread; see benchmarks/results/dqn_proxy.md for which keeps throughput higher. With --workers above 1 "
        "the one learner is always a process.",
    )
    actors: int = Field(
        0,
        ge=0,
        description="Simulator training with this many Ray rollout workers (one CPU each) feeding the one learner "
        "(lbproxy/train/ray_sim.py; `pip install 'lbproxy[distributed]'`); 0 = one process, no Ray.",
    )
    ray_address: str | None = Field(
        None, description="With --actors: join this Ray cluster (e.g. auto, ray://HOST:10001), not a local Ray."
    )

    @field_validator("policy")
    @classmethod
    def _check_policy(cls, v: str) -> str:
        if v not in POLICY_NAMES:
            raise ValueError(f"unknown policy {v!r}; choose one of: {', '.join(POLICY_NAMES)}")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = _TOML_PATH.get("path")
        if toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    @property
    def train_env(self) -> Literal["live", "sim"]:
        if self.env == "auto":
            return "live" if self.backends or self.cluster_file else "sim"
        return self.env

    def resolved_episodes(self) -> int:
        if self.episodes is not None:
            return self.episodes
        return 50 if self.mode == "evaluate" else 6000


_TOML_PATH: dict[str, Path | None] = {"path": None}


def _describe(err: Mapping[str, Any]) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()) if not isinstance(p, int)) or "settings"
    field = loc.split(".")[0]
    flag = "--" + field.replace("_", "-")
    env = "LBPROXY_" + field.upper()
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        return f"unknown setting {field!r} (in the TOML file or environment); see `lbproxy --help`"
    return f"invalid setting {flag} ({env}): {msg}"


def load_settings(overrides: dict[str, Any] | None = None) -> Settings:
    """Build Settings from CLI overrides, environment and TOML; raises ConfigError with one line."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    toml = overrides.get("config") or os.environ.get("LBPROXY_CONFIG")
    if toml is not None:
        path = Path(toml)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found; pass an existing TOML file to --config")
        _TOML_PATH["path"] = path
    else:
        _TOML_PATH["path"] = None
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0])) from None
    except ValueError as exc:  # e.g. a TOML syntax error
        raise ConfigError(f"cannot read configuration: {exc}") from None
    if settings.mode == "serve" and settings.model is not None and settings.policy != "dqn":
        # `lbproxy --mode serve --model dqn_final.pth` means "serve this model": a model implies the dqn
        # policy unless another policy was asked for explicitly, which would silently ignore the model.
        if "policy" in settings.model_fields_set:
            raise ConfigError(
                f"invalid setting --model (LBPROXY_MODEL): a model is only used by --policy dqn, "
                f"not {settings.policy!r}; drop --model or use --policy dqn"
            )
        settings.policy = "dqn"
    if settings.cluster_file is not None and not settings.backends:
        settings.backends = backends_from_cluster_file(settings.cluster_file)
    if settings.workers > 1 and settings.mode == "train" and settings.train_env == "sim":
        raise ConfigError("invalid setting --workers: simulator training runs in parallel with --actors N")
    if settings.actors and settings.mode == "train" and settings.train_env == "live":
        raise ConfigError("invalid setting --actors (LBPROXY_ACTORS): Ray actors train in the simulator (--env sim)")
    return settings


def backends_from_cluster_file(path: Path) -> list[BackendSpec]:
    """Backends of a cluster TOML (see lbproxy.cluster); weight = workers x speed."""
    from lbproxy.cluster import ClusterSpecError, load_cluster

    try:
        cluster = load_cluster(path)
    except ClusterSpecError as exc:
        raise ConfigError(f"invalid setting --cluster-file: {exc}") from None
    return [BackendSpec(url=s.url, weight=s.workers * s.speed, name=s.name) for s in cluster.servers]
