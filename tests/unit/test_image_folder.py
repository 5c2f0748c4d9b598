"""A site's own PNG/JPEG files (spec.data source image-folder) through the real trainer: class
sub-folders or an index, decoded batch by batch in DataLoader workers (Pillow), checked per
file. The oracle for the pixels is numpy on the arrays the files were written from.

What this does not check: a PVC mounted by a real kubelet (the e2e tests' kubelet runs the
trainer in process); S3: tests/e2e/test_data_from_s3.py reads an image folder from SeaweedFS."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mfed.learning.data import DataError
from mfed.learning.data_root import LocalRoot
from mfed.learning.image_folder import (
    BadRecords,
    ImageFolderSplit,
    OnBadRecord,
    in_validation,
    list_class_folders,
    load_image_folder,
)
from mfed.model_store import write_global_model
from mfed.rounds.initial import init_global_model
from mfed.rounds.site_round import BadInput, run_site_round
from mfed.spec import (
    ArchSpec,
    DataSource,
    DataSpec,
    InitSpec,
    RoundSpec,
    SharingPolicy,
    TaskGroupSpec,
    TaskSpec,
    TrainingSpec,
)
from mfed.storage import Storage
from tests.unit.factories import IMAGE_FOLDER_CASES, spoil_image_folder, write_image_folder

ENCODER = ArchSpec(name="small_cnn")
GROUP = TaskGroupSpec(
    task=TaskSpec(name="parts", type="classification", params={"num_classes": 3}), decoder=ArchSpec(name="mlp")
)


def _spec(tmp_path: Path, data: DataSpec, site: str = "plant-a") -> RoundSpec:
    init = InitSpec(
        federation="fed",
        encoder=ENCODER,
        groups=(GROUP,),
        sharing=SharingPolicy(),
        seed=3,
        output=str(tmp_path / "r0" / "global"),
    )
    model_bytes, manifest = init_global_model(init)
    write_global_model(Storage(), init.output, model_bytes, manifest)
    return RoundSpec(
        federation="fed",
        round=1,
        site=site,
        task=GROUP.task,
        encoder=ENCODER,
        decoder=GROUP.decoder,
        training=TrainingSpec(epochs=4, learning_rate=3e-3),
        data=data,
        global_model=init.output,
        previous_decoder=None,
        output=str(tmp_path / "r1" / "sites" / site),
    )


def test_a_site_trains_a_round_on_its_imagewrite_image_folder(tmp_path):
    write_image_folder(tmp_path / "images")
    data = DataSpec(source=DataSource.IMAGE_FOLDER, uri=str(tmp_path / "images"))
    metrics = run_site_round(_spec(tmp_path, data), Storage()).manifest.metrics
    assert metrics["val_after"] > metrics["val_before"] + 20  # it learned from the files
    assert "bad_records_skipped" in metrics and metrics["bad_records_skipped"] == 0


def test_the_decoded_batches_are_the_pixels_that_were_written(tmp_path):
    written = write_image_folder(tmp_path / "images", per_class=5)
    root = LocalRoot(tmp_path / "images")
    records, classes = list_class_folders(root, BadRecords())
    assert classes == ("class-0", "class-1", "class-2")
    split = ImageFolderSplit(root, records, (1, 28, 28), BadRecords(), loader_workers=2)
    order = [torch.tensor([3, 0, 14]), torch.tensor([7])]
    batches = list(split.batches(order))
    for index, (x, y) in zip(order, batches, strict=True):
        for i, row, target in zip(index.tolist(), x, y, strict=True):
            expected = written[records[i].key].astype(np.float32)[None] / 255.0
            np.testing.assert_array_equal(row.numpy(), expected)
            assert int(target) == int(records[i].key.split("/")[0][-1])


def test_the_validation_split_of_a_file_does_not_move_when_files_are_added(tmp_path):
    keys = [f"class-0/{i:03d}.png" for i in range(200)]
    before = {k for k in keys if in_validation(k, 7, 0.2)}
    assert 20 < len(before) < 60  # about a fifth
    more = keys + [f"class-1/{i:03d}.png" for i in range(200)]
    assert {k for k in more if in_validation(k, 7, 0.2)} & set(keys) == before
    assert {k for k in keys if in_validation(k, 8, 0.2)} != before  # the seed decides


@pytest.mark.parametrize("case", IMAGE_FOLDER_CASES)
def test_a_bad_record_fails_the_site_naming_the_file_and_the_problem(tmp_path, case):
    write_image_folder(tmp_path / "images", per_class=12)
    expected = spoil_image_folder(tmp_path / "images", case)
    index = "index.csv" if case == "missing" else None
    data = DataSpec(source=DataSource.IMAGE_FOLDER, uri=str(tmp_path / "images"), index=index, loader_workers=0)
    with pytest.raises(BadInput, match=expected.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        run_site_round(_spec(tmp_path, data), Storage())


@pytest.mark.parametrize("case", ["unreadable", "mode", "size", "label"])
def test_with_on_bad_record_skip_the_site_trains_and_counts_what_it_left_out(tmp_path, case):
    write_image_folder(tmp_path / "images", per_class=12)
    spoil_image_folder(tmp_path / "images", case)
    data = DataSpec(
        source=DataSource.IMAGE_FOLDER, uri=str(tmp_path / "images"), on_bad_record="skip", max_bad_records=3
    )
    metrics = run_site_round(_spec(tmp_path, data), Storage()).manifest.metrics
    # a decode-time problem is found only if the file was read this round (train or validation)
    assert metrics["bad_records_skipped"] == 1


def test_more_bad_records_than_the_cap_fail_the_site_anyway(tmp_path):
    write_image_folder(tmp_path / "images", per_class=12)
    for i in range(3):
        (tmp_path / "images" / "class-0" / f"{i:03d}.png").write_bytes(b"garbage")
    data = DataSpec(
        source=DataSource.IMAGE_FOLDER, uri=str(tmp_path / "images"), on_bad_record="skip", max_bad_records=2
    )
    with pytest.raises(BadInput, match="3 bad records, more than maxBadRecords 2"):
        run_site_round(_spec(tmp_path, data), Storage())


def test_an_empty_or_absent_folder_says_what_is_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    for root, message in ((tmp_path / "nowhere", "does not exist"), (tmp_path / "empty", "no class sub-folders")):
        with pytest.raises(DataError, match=message):
            load_image_folder(
                DataSpec(source=DataSource.IMAGE_FOLDER, uri=str(root)), (1, 28, 28), 3, val_fraction=0.2, split_seed=0
            )


def test_an_index_names_files_and_targets_instead_of_folders(tmp_path):
    write_image_folder(tmp_path / "images", per_class=10)
    lines = [f'{{"file": "class-{c}/{i:03d}.png", "target": {2 - c}}}' for c in range(3) for i in range(10)]
    (tmp_path / "images" / "labels.jsonl").write_text("\n".join(lines) + "\n")
    spec = DataSpec(source=DataSource.IMAGE_FOLDER, uri=str(tmp_path / "images"), index="labels.jsonl")
    data = load_image_folder(spec, (1, 28, 28), 3, val_fraction=0.2, split_seed=0)
    splits = [data.train, data.val]
    records = [s.record(i) for s in splits for i in range(len(s))]  # type: ignore[union-attr]
    assert len(records) == 30
    assert all(r.target == 2 - int(r.key.split("/")[0][-1]) for r in records)  # the index's targets win
    assert BadRecords(policy=OnBadRecord.SKIP).policy is OnBadRecord.SKIP


def test_the_job_spec_carries_the_folder_settings_and_other_data_reads_as_before():
    from mfed.fields import Fields

    folder = DataSpec(
        source=DataSource.IMAGE_FOLDER, uri="/d/img", index="i.csv", on_bad_record="skip", max_bad_records=4
    )
    assert DataSpec.parse(Fields(folder.to_dict(), "data")) == folder
    assert "onBadRecord" not in DataSpec(source=DataSource.NPZ, uri="/d/a.npz").to_dict()
