from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.kubeapi import KubeAPI, running_kubeapi


@pytest.fixture
def kubeapi() -> Iterator[KubeAPI]:
    with running_kubeapi() as api:
        yield api


@pytest.fixture
def namespace() -> str:
    return "team-a"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
