"""Operator configuration: one frozen dataclass, loaded and validated once from the environment.

Every variable starts with `MFED_OPERATOR_`; docs/operator-contract.md lists them all. Handlers
never read `os.environ`; they get this object through kopf's memo.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from mfed.registry import PluginError, parse_declared

PREFIX = "MFED_OPERATOR_"


class ConfigError(ValueError):
    """An environment variable is malformed; the operator refuses to start."""


@dataclass(frozen=True, kw_only=True)
class OperatorConfig:
    # Which namespaces to watch; empty means the whole cluster.
    watch_namespaces: tuple[str, ...] = ()
    trainer_image: str = "mfed-trainer:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    metrics_port: int = 9090  # 0 disables the metrics endpoint
    metrics_host: str = "0.0.0.0"  # in a Pod, so Prometheus reaches it; tests bind 127.0.0.1
    health_port: int = 8080
    health_path: str = "/healthz"
    health_host: str = "0.0.0.0"
    # Storage defaults for FederationRounds that leave them out.
    default_s3_endpoint: str | None = None
    default_s3_secret: str | None = None
    default_s3_region: str = "us-east-1"
    # Seconds between reconciliations of an active FederationRound.
    resync_seconds: float = 10.0
    # How long a new round waits for missing sites/Secrets/previous rounds before failing.
    validation_grace_seconds: float = 60.0
    default_deadline_seconds: int = 6 * 3600
    job_backoff_limit: int = 3
    job_ttl_seconds_after_finished: int | None = None
    # Storage: per-call timeouts, SDK-level attempts, and how long a round retries before failing.
    s3_connect_timeout_seconds: float = 5.0
    s3_read_timeout_seconds: float = 60.0
    s3_max_attempts: int = 3
    storage_retry_base_seconds: float = 5.0
    storage_retry_max_seconds: float = 120.0
    storage_retry_limit_seconds: float = 1800.0
    # Kubernetes API calls made by the operator itself (kopf's own calls have kopf's settings).
    api_timeout_seconds: float = 30.0
    api_retry_delay_seconds: float = 5.0
    # Thread pool for blocking work (S3, aggregation, the Kubernetes client).
    worker_threads: int = 4
    max_sites_per_round: int = 256
    kubeconfig: str | None = None  # only outside a cluster (tests, local runs)
    log_format: str = "plain"  # plain or json
    log_level: str = "INFO"
    # Plugin names (`kind:name`, e.g. encoder:patch_net) the trainer image has but this image does
    # not: the operator accepts them in rounds without their entry-point metadata (docs/plugins.md).
    plugins: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if env is None else env
        known = {PREFIX + f.name.upper() for f in fields(cls)}
        unknown = sorted(k for k in env if k.startswith(PREFIX) and k not in known)
        if unknown:
            raise ConfigError(f"{unknown[0]} is not a known setting; known: {', '.join(sorted(known))}")
        r = _Reader(env)
        config = cls(
            watch_namespaces=r.csv("WATCH_NAMESPACES"),
            trainer_image=r.text("TRAINER_IMAGE", cls.trainer_image),
            image_pull_policy=r.choice("IMAGE_PULL_POLICY", cls.image_pull_policy, ("Always", "IfNotPresent", "Never")),
            metrics_port=r.integer("METRICS_PORT", cls.metrics_port, 0, 65535),
            metrics_host=r.text("METRICS_HOST", cls.metrics_host),
            health_port=r.integer("HEALTH_PORT", cls.health_port, 1, 65535),
            health_path=r.text("HEALTH_PATH", cls.health_path),
            health_host=r.text("HEALTH_HOST", cls.health_host),
            default_s3_endpoint=r.opt_text("DEFAULT_S3_ENDPOINT"),
            default_s3_secret=r.opt_text("DEFAULT_S3_SECRET"),
            default_s3_region=r.text("DEFAULT_S3_REGION", cls.default_s3_region),
            resync_seconds=r.number("RESYNC_SECONDS", cls.resync_seconds, 0.1),
            validation_grace_seconds=r.number("VALIDATION_GRACE_SECONDS", cls.validation_grace_seconds, 0),
            default_deadline_seconds=r.integer("DEFAULT_DEADLINE_SECONDS", cls.default_deadline_seconds, 1),
            job_backoff_limit=r.integer("JOB_BACKOFF_LIMIT", cls.job_backoff_limit, 0, 100),
            job_ttl_seconds_after_finished=r.opt_integer("JOB_TTL_SECONDS_AFTER_FINISHED", 0),
            s3_connect_timeout_seconds=r.number("S3_CONNECT_TIMEOUT_SECONDS", cls.s3_connect_timeout_seconds, 0.1),
            s3_read_timeout_seconds=r.number("S3_READ_TIMEOUT_SECONDS", cls.s3_read_timeout_seconds, 0.1),
            s3_max_attempts=r.integer("S3_MAX_ATTEMPTS", cls.s3_max_attempts, 1, 20),
            storage_retry_base_seconds=r.number("STORAGE_RETRY_BASE_SECONDS", cls.storage_retry_base_seconds, 0.1),
            storage_retry_max_seconds=r.number("STORAGE_RETRY_MAX_SECONDS", cls.storage_retry_max_seconds, 0.1),
            storage_retry_limit_seconds=r.number("STORAGE_RETRY_LIMIT_SECONDS", cls.storage_retry_limit_seconds, 1),
            api_timeout_seconds=r.number("API_TIMEOUT_SECONDS", cls.api_timeout_seconds, 0.1),
            api_retry_delay_seconds=r.number("API_RETRY_DELAY_SECONDS", cls.api_retry_delay_seconds, 0.1),
            worker_threads=r.integer("WORKER_THREADS", cls.worker_threads, 1, 64),
            max_sites_per_round=r.integer("MAX_SITES_PER_ROUND", cls.max_sites_per_round, 1, 256),
            kubeconfig=r.opt_text("KUBECONFIG"),
            log_format=r.choice("LOG_FORMAT", cls.log_format, ("plain", "json")),
            log_level=r.choice("LOG_LEVEL", cls.log_level, ("DEBUG", "INFO", "WARNING", "ERROR")),
            plugins=r.csv("PLUGINS"),
        )
        try:
            parse_declared(config.plugins)
        except PluginError as exc:
            raise ConfigError(f"{PREFIX}PLUGINS: {exc}") from None
        if config.storage_retry_max_seconds < config.storage_retry_base_seconds:
            raise ConfigError(f"{PREFIX}STORAGE_RETRY_MAX_SECONDS must be at least STORAGE_RETRY_BASE_SECONDS")
        if not config.health_path.startswith("/"):
            raise ConfigError(f"{PREFIX}HEALTH_PATH must start with '/'")
        if config.metrics_port and config.metrics_port == config.health_port:
            raise ConfigError(f"{PREFIX}METRICS_PORT and HEALTH_PORT must differ")
        return config

    @property
    def liveness_endpoint(self) -> str:
        return f"http://{self.health_host}:{self.health_port}{self.health_path}"


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def _raw(self, name: str) -> str | None:
        value = self._env.get(PREFIX + name)
        return value.strip() if value is not None and value.strip() else None

    def text(self, name: str, default: str) -> str:
        return self._raw(name) or default

    def opt_text(self, name: str) -> str | None:
        return self._raw(name)

    def csv(self, name: str) -> tuple[str, ...]:
        raw = self._raw(name) or ""
        return tuple(sorted({part.strip() for part in raw.split(",") if part.strip()}))

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(name, default)
        if value not in choices:
            raise ConfigError(f"{PREFIX}{name}={value!r}: use one of {', '.join(choices)}")
        return value

    def integer(self, name: str, default: int, minimum: int, maximum: int | None = None) -> int:
        value = self.opt_integer(name, minimum, maximum)
        return default if value is None else value

    def opt_integer(self, name: str, minimum: int, maximum: int | None = None) -> int | None:
        raw = self._raw(name)
        if raw is None:
            return None
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{PREFIX}{name}={raw!r} is not an integer") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise ConfigError(f"{PREFIX}{name}={value} must be {bound}")
        return value

    def number(self, name: str, default: float, minimum: float) -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{PREFIX}{name}={raw!r} is not a number") from None
        if not value >= minimum:
            raise ConfigError(f"{PREFIX}{name}={value} must be at least {minimum}")
        return value
