"""A site's image folder and tar shards under an S3 prefix, read by the trainer from a real S3
server (SeaweedFS) with the environment a site Job gets: listed with ListObjectsV2, images one
GET each, shards downloaded into a bounded local cache. Oracles: the arrays the files were
written from, and the same files read from a directory.

What this does not check: an AWS or MinIO endpoint (SeaweedFS speaks the same S3 API; the e2e
federations use it too), and a disk filling up under the cache (its bound is checked here)."""

from __future__ import annotations

import json
import pickle
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from mfed.cli import main
from mfed.learning.data import DataError
from mfed.learning.data_root import DataCache, LocalRoot, S3Root
from mfed.learning.image_folder import BadRecords, list_class_folders
from mfed.learning.tar_shards import SHARD_INDEX, TarShardSplit, list_shards, shard_listing
from mfed.rounds.site_round import run_site_round
from mfed.spec import DataSource, DataSpec
from mfed.storage import S3Settings, Storage
from tests.e2e.conftest import BUCKET, Cluster
from tests.support import manifests as m
from tests.support.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedFS
from tests.unit.factories import (
    IMAGE_FOLDER_CASES,
    TAR_SHARD_CASES,
    spoil_image_folder,
    spoil_tar_shards,
    write_image_folder,
    write_tar_shards,
)
from tests.unit.test_image_folder import _spec

pytestmark = pytest.mark.slow


def _upload(seaweed: SeaweedFS, folder: Path, prefix: str) -> str:
    client = seaweed.client()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return f"s3://{BUCKET}/{prefix}"


@pytest.fixture
def s3_env(seaweed: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Settings]:
    """The S3 environment the operator gives a site Job (mfed_operator.domain.jobs.storage_env)."""
    for name, value in (
        ("MFED_S3_ENDPOINT", seaweed.endpoint),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ("MFED_S3_PATH_STYLE", "true"),
    ):
        monkeypatch.setenv(name, value)
    yield S3Settings.from_env()


def _stream(split: TarShardSplit) -> list[bytes]:
    return [x.numpy().tobytes() for xs, _ in split.stream(batch_size=5, seed=None) for x in xs]


def test_tar_shards_in_s3_stream_the_same_samples_as_the_directory_and_the_cache_stays_bounded(
    seaweed: SeaweedFS, s3_env: S3Settings, tmp_path: Path
) -> None:
    written = write_tar_shards(tmp_path / "shards", shards=6, per_shard=8)
    uri = _upload(seaweed, tmp_path / "shards", "bounded/shards")
    largest = max(p.stat().st_size for p in (tmp_path / "shards").iterdir())
    cache = DataCache(tmp_path / "cache", limit_bytes=3 * largest)  # loaderWorkers 2 + 1 shards
    remote = S3Root(uri, cache, s3_env)
    assert [f.key for f in list_shards(remote)] == sorted(p.name for p in (tmp_path / "shards").iterdir())
    local = LocalRoot(tmp_path / "shards")

    in_order = TarShardSplit(remote, list_shards(remote), (1, 28, 28), 3, BadRecords(), loader_workers=0)
    assert len(in_order) == 48  # counted from the tar headers of the cached copies
    pixels = [(p.astype(np.float32)[None] / 255.0).tobytes() for p, _ in written.values()]
    assert _stream(in_order) == pixels  # archive order, shard after shard: what was written
    directory = TarShardSplit(local, list_shards(local), (1, 28, 28), 3, BadRecords(), loader_workers=0)
    assert _stream(directory) == pixels

    held = []
    shuffled = TarShardSplit(remote, list_shards(remote), (1, 28, 28), 3, BadRecords(), loader_workers=2)
    streamed = []
    for xs, _ in shuffled.stream(batch_size=4, seed=7):
        held.append(cache.held_bytes())
        streamed += [x.numpy().tobytes() for x in xs]
    assert sorted(streamed) == sorted(pixels)  # every sample once, through two forked workers
    assert max(held) <= cache.limit and len(list((tmp_path / "cache").iterdir())) <= 4  # 3 shards + the lock

    tiny = S3Root(uri, DataCache(tmp_path / "tiny", limit_bytes=largest - 1), s3_env)
    with pytest.raises(DataError, match=r"larger than the data cache .* raise spec\.data\.s3\.cacheMiB"):
        tiny.open(list_shards(tiny)[0])


def test_with_a_shard_index_in_s3_nothing_is_downloaded_before_training(
    seaweed: SeaweedFS, s3_env: S3Settings, tmp_path: Path
) -> None:
    write_tar_shards(tmp_path / "shards", shards=4, per_shard=6)
    shardlist = [
        {"url": p.name, "nsamples": 6, "filesize": p.stat().st_size} for p in sorted((tmp_path / "shards").iterdir())
    ]
    (tmp_path / "shards" / SHARD_INDEX).write_text(
        json.dumps({"__kind__": "wids-shard-index-v1", "shardlist": shardlist})
    )
    uri = _upload(seaweed, tmp_path / "shards", "indexed/shards")
    cache = DataCache(tmp_path / "cache", 2**20)
    remote = S3Root(uri, cache, s3_env)
    shards, counts = shard_listing(remote)
    split = TarShardSplit(remote, shards, (1, 28, 28), 3, BadRecords(), loader_workers=0, counts=counts)
    assert len(split) == 24 and cache.held_bytes() == 0  # planned from the index: no shard fetched
    assert len(_stream(split)) == 24 and cache.held_bytes() > 0  # then read through the cache


def test_an_image_folder_in_s3_trains_a_site_round_and_lists_as_the_directory(
    seaweed: SeaweedFS, s3_env: S3Settings, tmp_path: Path
) -> None:
    write_image_folder(tmp_path / "images", per_class=20)
    uri = _upload(seaweed, tmp_path / "images", "plant-a/images")
    records, classes = list_class_folders(S3Root(uri, DataCache(tmp_path / "c", 1), s3_env), BadRecords())
    assert (records, classes) == list_class_folders(LocalRoot(tmp_path / "images"), BadRecords())
    data = DataSpec(source=DataSource.IMAGE_FOLDER, uri=uri)
    metrics = run_site_round(_spec(tmp_path, data), Storage()).manifest.metrics
    assert metrics["val_after"] > metrics["val_before"] + 20  # it learned from the images it fetched


def _site(cluster: Cluster, name: str, data: dict[str, Any]) -> None:
    body = m.sitetask(
        cluster.namespace,
        name,
        federation="own-data",
        task="parts",
        task_type="classification",
        shard=0,
        shards=1,
        params={"num_classes": 3},
        data={"s3": data},
    )
    cluster.apply(body)


def test_each_bad_data_case_fails_its_site_with_the_file_and_problem_in_both_statuses(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Through the real operator: each SiteTask's spec.data.s3 reaches its Job, the trainer reads
    the prefix with the Job's S3 environment, good sites on S3 shards are aggregated, and every
    bad-data case of the issue fails only its own site, its trainer's words (file and problem)
    in the round's status.sites[] and in the SiteTask's status.lastRound."""
    cluster.secret()
    expected: dict[str, str] = {}
    for index, site in enumerate(("shards-a", "shards-b")):
        write_tar_shards(tmp_path / site / "train", shards=5, per_shard=16, seed=index)
        write_tar_shards(tmp_path / site / "test", shards=2, per_shard=8, seed=index + 10)
        train = _upload(cluster.s3, tmp_path / site / "train", f"data/{site}/train")
        test = _upload(cluster.s3, tmp_path / site / "test", f"data/{site}/test")
        _site(cluster, site, {"uri": train, "testUri": test, "format": "tar-shards", "cacheMiB": 8})
    for case in TAR_SHARD_CASES:
        site = f"bad-shards-{case}"
        write_tar_shards(tmp_path / site, shards=6, per_shard=10)
        expected[site] = spoil_tar_shards(tmp_path / site, case)
        uri = _upload(cluster.s3, tmp_path / site, f"data/{site}")
        # one loader worker reads every shard (validation scored, training trained in the epoch)
        _site(cluster, site, {"uri": uri, "format": "tar-shards", "loaderWorkers": 0})
    for case in IMAGE_FOLDER_CASES:
        site = f"bad-folder-{case}"
        write_image_folder(tmp_path / site, per_class=12)
        expected[site] = spoil_image_folder(tmp_path / site, case)
        uri = _upload(cluster.s3, tmp_path / site, f"data/{site}")
        index = {"index": "index.csv"} if case == "missing" else {}
        _site(cluster, site, {"uri": uri, "format": "image-folder", "loaderWorkers": 0, **index})
    cluster.apply(
        m.federation_round(
            cluster.namespace,
            "on-own-data",
            federation="own-data",
            bucket=BUCKET,
            endpoint=cluster.s3.endpoint,
            training={"method": "task-fedavg", "epochs": 1, "batchSize": 32},
            aggregation={"minSites": 2, "deadlineSeconds": 600},
        )
    )
    status = cluster.wait_phase("on-own-data", "Succeeded", "Failed", timeout=400)
    assert status["phase"] == "Succeeded", status
    sites = {s["site"]: s for s in status["sites"]}
    assert {sites[s]["phase"] for s in ("shards-a", "shards-b")} == {"Accepted"}
    for site, words in expected.items():
        assert (sites[site]["phase"], sites[site]["reason"]) == ("Failed", "BadInput"), sites[site]
        assert words in sites[site]["message"], (site, sites[site]["message"])
        last = cluster.last_round(site, "on-own-data")
        assert (last["result"], last["reason"]) == ("Failed", "BadInput") and words in last["message"], last


def test_a_shard_that_is_not_an_archive_is_refused_before_it_is_trained_on(
    seaweed: SeaweedFS, s3_env: S3Settings, tmp_path: Path
) -> None:
    write_tar_shards(tmp_path / "shards", shards=3, per_shard=4)
    (tmp_path / "shards" / "shard-0001.tar").write_bytes(b"not a tar archive" * 64)
    uri = _upload(seaweed, tmp_path / "shards", "garbage/shards")
    remote = S3Root(uri, DataCache(tmp_path / "cache", 2**20), s3_env)
    split = TarShardSplit(remote, list_shards(remote), (1, 28, 28), 3, BadRecords(), loader_workers=0)
    with pytest.raises(DataError, match=r"shard-0001\.tar: truncated archive"):
        _stream(split)
    assert tarfile.is_tarfile(tmp_path / "shards" / "shard-0000.tar")


def test_an_s3_root_travels_to_a_spawned_worker_without_its_client(
    seaweed: SeaweedFS, s3_env: S3Settings, tmp_path: Path
) -> None:
    """The pilot pickles a site's data into its worker processes (spawn)."""
    write_image_folder(tmp_path / "images", per_class=2)
    root = S3Root(_upload(seaweed, tmp_path / "images", "pickled/images"), DataCache(tmp_path / "c", 1), s3_env)
    listed = root.files()  # the client now exists
    copy = pickle.loads(pickle.dumps(root))
    assert copy.files() == listed and copy.read(listed[0].key) == root.read(listed[0].key)


def test_the_pilot_reads_a_federations_s3_image_folders_from_the_endpoint_it_is_given(
    seaweed: SeaweedFS, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`mfed pilot -f DIR --storage URL`: the sites' spec.data.s3 read from that S3 endpoint."""
    monkeypatch.delenv("MFED_S3_ENDPOINT", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    documents = []
    for seed, site in enumerate(("line-a", "line-b")):
        write_image_folder(tmp_path / site / "train", per_class=10, seed=seed)
        write_image_folder(tmp_path / site / "test", per_class=3, seed=seed + 10)
        train = _upload(seaweed, tmp_path / site / "train", f"pilot/{site}/train")
        test = _upload(seaweed, tmp_path / site / "test", f"pilot/{site}/test")
        body = m.sitetask("", site, federation="lines", task="parts", task_type="classification", shard=0, shards=1)
        body["metadata"].pop("namespace")
        body["spec"]["task"]["params"] = {"num_classes": 3}
        body["spec"]["data"] = {"s3": {"uri": train, "testUri": test, "format": "image-folder"}}
        documents.append(body)
    fr = m.federation_round("", "lines-r1", federation="lines", bucket=BUCKET, endpoint=seaweed.endpoint)
    fr["metadata"].pop("namespace")
    fr["spec"]["training"] = {"method": "m-fed", "minSteps": 2, "maxSteps": 2, "batchSize": 8}
    documents.append(fr)
    (manifests / "federation.yaml").write_text(yaml.safe_dump_all(documents))
    out = tmp_path / "out"
    argv = ["pilot", "-f", str(manifests), "--storage", seaweed.endpoint, "--methods", "local,m-fed"]
    assert main([*argv, "--workers", "0", "--no-progress", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["sites"]["line-a"]["data"]["uri"] == f"s3://{BUCKET}/pilot/line-a/train"
    assert results["methods"]["mfed"]["site_steps"]["0"] == {"line-a": 2, "line-b": 2}
