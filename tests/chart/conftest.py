"""Fixtures of the chart tests: each chart test runs with helm 4 and with helm 3."""

from __future__ import annotations

import pytest

from tests.chart.tools import Helm, helm_binary


@pytest.fixture(params=[4, 3], ids=["helm4", "helm3"], scope="session")
def helm(request: pytest.FixtureRequest) -> Helm:
    return helm_binary(int(request.param))


@pytest.fixture(scope="session")
def helm4() -> Helm:
    return helm_binary(4)
