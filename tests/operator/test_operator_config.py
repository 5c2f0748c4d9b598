"""Operator configuration: one frozen dataclass from MFED_OPERATOR_* variables, checked once."""

from __future__ import annotations

import dataclasses

import pytest
from mfed_operator.config import ConfigError, OperatorConfig


def test_defaults_match_the_contract_with_the_chart() -> None:
    config = OperatorConfig.from_env({})
    assert config.watch_namespaces == ()
    assert (config.metrics_port, config.health_port, config.health_path) == (9090, 8080, "/healthz")
    assert config.liveness_endpoint == "http://0.0.0.0:8080/healthz"


def test_settings_are_read_from_prefixed_variables() -> None:
    config = OperatorConfig.from_env(
        {
            "MFED_OPERATOR_WATCH_NAMESPACES": " team-b, team-a,,team-a ",
            "MFED_OPERATOR_TRAINER_IMAGE": "registry.example/trainer@sha256:abc",
            "MFED_OPERATOR_DEFAULT_S3_SECRET": "s3",
            "MFED_OPERATOR_RESYNC_SECONDS": "2.5",
            "OTHER_VARIABLE": "ignored",
        }
    )
    assert config.watch_namespaces == ("team-a", "team-b")
    assert config.trainer_image == "registry.example/trainer@sha256:abc"
    assert config.default_s3_secret == "s3"
    assert config.resync_seconds == 2.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.resync_seconds = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MFED_OPERATOR_METRIC_PORT": "1"}, "MFED_OPERATOR_METRIC_PORT is not a known setting"),
        ({"MFED_OPERATOR_METRICS_PORT": "http"}, "is not an integer"),
        ({"MFED_OPERATOR_METRICS_PORT": "70000"}, "must be between 0 and 65535"),
        ({"MFED_OPERATOR_LOG_FORMAT": "xml"}, "use one of plain, json"),
        ({"MFED_OPERATOR_METRICS_PORT": "8080"}, "METRICS_PORT and HEALTH_PORT must differ"),
        ({"MFED_OPERATOR_HEALTH_PATH": "healthz"}, "must start with '/'"),
    ],
)
def test_a_bad_variable_stops_the_operator_with_a_message_naming_it(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        OperatorConfig.from_env(env)


def test_the_metrics_server_binds_the_configured_address_only() -> None:
    from mfed_operator.metrics import Metrics

    from tests.support.ports import free_ports

    (port,) = free_ports(1)
    config = OperatorConfig.from_env(
        {"MFED_OPERATOR_METRICS_HOST": "127.0.0.1", "MFED_OPERATOR_METRICS_PORT": str(port)}
    )
    assert OperatorConfig.from_env({}).metrics_host == "0.0.0.0"  # a Pod's default: Prometheus must reach it
    metrics = Metrics()
    metrics.serve(config.metrics_port, config.metrics_host)
    try:
        assert metrics._server is not None and metrics._server.server_address == ("127.0.0.1", port)
    finally:
        metrics.stop()
