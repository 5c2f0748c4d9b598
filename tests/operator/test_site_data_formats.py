"""spec.data.pvc.format and spec.data.s3.format from the SiteTask to the trainer's DataSpec (what the Job
runs with), and the operator's own refusals naming the field. The CEL and schema rules are in
test_crd_rules.py; the trainer's reading of the folder in tests/unit/test_image_folder.py."""

from __future__ import annotations

import pytest

from mfed.resources.method_settings import PVC_MOUNT, data_spec
from mfed.resources.views import ResourceError
from mfed.spec import DataSource
from tests.operator.builders import site


def test_an_image_folder_on_a_claim_reaches_the_trainer_with_its_settings():
    pvc = {
        "claimName": "inspection",
        "path": "line-3/images",
        "testPath": "line-3/held-out",
        "format": "image-folder",
        "index": "labels.csv",
        "onBadRecord": "skip",
        "maxBadRecords": 50,
        "loaderWorkers": 4,
    }
    spec = data_spec(site("plant-a", data={"pvc": pvc}))
    assert spec.source is DataSource.IMAGE_FOLDER
    assert (spec.uri, spec.test_uri) == (f"{PVC_MOUNT}/line-3/images", f"{PVC_MOUNT}/line-3/held-out")
    assert (spec.index, spec.on_bad_record, spec.max_bad_records, spec.loader_workers) == ("labels.csv", "skip", 50, 4)
    npz = data_spec(site("plant-b", data={"pvc": {"claimName": "c", "path": "train.npz"}}))
    assert npz.source is DataSource.NPZ  # format unset: the .npz it always was


@pytest.mark.parametrize(
    ("pvc", "field"),
    [
        ({"claimName": "c", "path": "a.npz", "onBadRecord": "skip"}, "spec.data.pvc.onBadRecord"),
        ({"claimName": "c", "path": "img", "format": "image-folder", "index": "../x.csv"}, "spec.data.pvc.index"),
        ({"claimName": "c", "path": "img", "format": "parquet"}, "spec.data.pvc.format"),
        (
            {"claimName": "c", "path": "img", "format": "image-folder", "maxBadRecords": -1},
            "spec.data.pvc.maxBadRecords",
        ),
    ],
)
def test_bad_data_settings_are_refused_naming_the_field(pvc, field):
    with pytest.raises(ResourceError, match=field.replace(".", r"\.")):
        site("plant-c", data={"pvc": pvc})


def test_tar_shards_on_a_claim_reach_the_trainer_and_take_no_index():
    pvc = {"claimName": "c", "path": "shards", "format": "tar-shards", "onBadRecord": "skip", "maxBadRecords": 3}
    spec = data_spec(site("plant-d", data={"pvc": pvc}))
    assert (spec.source, spec.uri, spec.max_bad_records) == (DataSource.TAR_SHARDS, f"{PVC_MOUNT}/shards", 3)
    with pytest.raises(ResourceError, match=r"spec\.data\.pvc\.index"):
        site("plant-e", data={"pvc": {**pvc, "index": "x.csv"}})


def test_shards_under_an_s3_prefix_reach_the_trainer_with_their_cache_and_an_npz_takes_none():
    s3 = {"uri": "s3://plant/shards", "testUri": "s3://plant/held-out", "format": "tar-shards", "cacheMiB": 512}
    spec = data_spec(site("plant-f", data={"s3": s3}))
    assert (spec.source, spec.uri, spec.test_uri) == (DataSource.TAR_SHARDS, "s3://plant/shards", "s3://plant/held-out")
    assert spec.cache_mib == 512 and spec.to_dict()["cacheMiB"] == 512
    folder = data_spec(site("plant-g", data={"s3": {"uri": "s3://plant/images", "format": "image-folder"}}))
    assert (folder.source, folder.cache_mib) == (DataSource.IMAGE_FOLDER, 2048)
    npz = data_spec(site("plant-h", data={"s3": {"uri": "s3://plant/train.npz"}}))
    assert npz.source is DataSource.NPZ and "cacheMiB" not in npz.to_dict()  # the Job an .npz always got
    with pytest.raises(ResourceError, match=r"spec\.data\.s3\.cacheMiB"):
        site("plant-i", data={"s3": {"uri": "s3://plant/train.npz", "cacheMiB": 64}})


def test_a_reader_the_operator_does_not_know_stops_the_round_before_any_job():
    from mfed_operator.domain.validation import check_plugins

    from mfed.registry import builtin_catalog
    from tests.operator.builders import round_view

    reader = {"claimName": "c", "path": "d", "format": "plugin", "dataset": "parquet-rows", "params": {"k": 1}}
    sites = [site("plant-f", data={"pvc": reader})]
    assert data_spec(sites[0]).params == {"k": 1}
    problems = check_plugins(round_view(), sites, builtin_catalog())
    assert len(problems) == 1 and "spec.data.pvc.dataset" in problems[0].message
    assert problems[0].reason == "UnknownDataSetFormat" and "tar-shards" in problems[0].message
    fine = {"claimName": "c", "path": "d", "format": "plugin", "dataset": "tar-shards"}
    assert check_plugins(round_view(), [site("plant-g", data={"pvc": fine})], builtin_catalog()) == []


def test_augmentation_reaches_the_trainer_for_any_source_and_bad_settings_name_the_field():
    spec = data_spec(site("plant-h", data={"demo": {"shardIndex": 0, "shardCount": 2}, "augment": {"flip": "both"}}))
    assert spec.augment.flip == "both" and spec.source is DataSource.FASHION_MNIST
    with pytest.raises(ResourceError, match=r"spec\.data\.augment\.brightness"):
        site("plant-i", data={"demo": {"shardIndex": 0, "shardCount": 2}, "augment": {"brightness": 2}})
