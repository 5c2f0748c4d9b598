"""A data set format of your own through the `mfed.datasets` entry points: a throw-away
distribution found by the real importlib.metadata, read by the real trainer; the built-in
formats resolve through the same registry."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mfed import registry
from mfed.rounds.site_round import BadInput, run_site_round
from mfed.spec import DataSource, DataSpec, SpecError
from mfed.storage import Storage
from tests.support.plugin import fake_distribution
from tests.unit.factories import class_image
from tests.unit.test_image_folder import _spec

READER = """
    from pathlib import Path

    import numpy as np

    from mfed.learning.data import SiteData, Split, as_images, split_train_val

    def npy_pair(spec, example_shape, classes, *, val_fraction, split_seed):
        root = Path(spec.uri)
        x = as_images(np.load(root / spec.params["images"]), "npy-pair")
        y = np.load(root / spec.params["labels"]).astype(np.int64)
        train, val = split_train_val(x, y, val_fraction, split_seed)
        return SiteData(train=train, val=val, test=None)

    def broken(spec, example_shape, classes, *, val_fraction, split_seed):
        return {"not": "site data"}
"""


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "dists"
    fake_distribution(
        root,
        "acme-data",
        {"mfed.datasets": {"npy-pair": "acme_data:npy_pair", "broken": "acme_data:broken"}},
        {"acme_data": READER},
    )
    monkeypatch.syspath_prepend(str(root))
    registry.refresh()
    yield root
    sys.modules.pop("acme_data", None)
    monkeypatch.undo()
    registry.refresh()


def _npy(root: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(150) % 3
    np.save(root / "images.npy", np.stack([class_image(int(c), rng) for c in labels]))
    np.save(root / "labels.npy", labels)


def test_a_site_trains_on_a_format_of_its_own(tmp_path, plugins):
    _npy(tmp_path)
    assert {"npy-pair", "image-folder", "tar-shards"} <= set(registry.names("dataset"))
    data = DataSpec(
        source=DataSource.PLUGIN,
        uri=str(tmp_path),
        dataset="npy-pair",
        params={"images": "images.npy", "labels": "labels.npy"},
    )
    metrics = run_site_round(_spec(tmp_path, data), Storage()).manifest.metrics
    assert metrics["val_after"] > metrics["val_before"] + 20


def test_a_reader_that_returns_something_else_or_is_missing_fails_the_site_saying_so(tmp_path, plugins):
    broken = DataSpec(source=DataSource.PLUGIN, uri=str(tmp_path), dataset="broken")
    with pytest.raises(BadInput, match="returned dict, not mfed SiteData"):
        run_site_round(_spec(tmp_path, broken), Storage())
    missing = DataSpec(source=DataSource.PLUGIN, uri=str(tmp_path), dataset="parquet-rows")
    with pytest.raises(BadInput, match=r"parquet-rows.*mfed\.datasets"):
        run_site_round(_spec(tmp_path, missing), Storage())


def test_plugin_data_needs_its_reader_named():
    with pytest.raises(SpecError, match=r"data\.dataset"):
        DataSpec(source=DataSource.PLUGIN, uri="/d")
    with pytest.raises(SpecError, match=r"data\.dataset"):
        DataSpec(source=DataSource.NPZ, uri="/d/a.npz", dataset="npy-pair")
