"""The trainer image as built (`make images`), run for real: one init and one site round against
the test SeaweedFS on loopback, as uid 10001, and the facts CI promises about the image.

tests/support/images.py says what `buildah run` is not (no read-only root filesystem option, no
cgroups); the image's own files are checked not writable by its user instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from mfed.artifacts.layout import MANIFEST_FILE, join
from mfed.artifacts.manifest import ContributionManifest, GlobalManifest
from mfed.spec import ArchSpec, DataSpec, InitSpec, RoundSpec, SharingPolicy, TrainingSpec
from tests.support.images import TRAINER, Container, container, image_config, image_size_bytes
from tests.support.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedFS
from tests.unit.factories import CLS, DENOISE

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BUCKET = "images"
ROOT = f"s3://{BUCKET}/fed"


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    server = SeaweedFS(tmp_path_factory.mktemp("seaweed"))
    try:
        server.start()
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def trainer() -> Iterator[Container]:
    with container(TRAINER) as c:
        yield c


def _s3_env(s3: SeaweedFS, spec: InitSpec | RoundSpec) -> dict[str, str]:
    return {
        "MFED_SPEC": json.dumps(spec.to_dict()),
        "MFED_S3_ENDPOINT": s3.endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "OMP_NUM_THREADS": "1",
    }


def _events(stdout: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_the_image_runs_an_init_and_a_site_round_against_real_s3(seaweed: SeaweedFS, trainer: Container) -> None:
    init = InitSpec(
        federation="fed",
        encoder=ArchSpec(name="small_cnn"),
        groups=(CLS, DENOISE),
        sharing=SharingPolicy(),
        seed=3,
        output=join(ROOT, "r0", "global"),
    )
    done = trainer.run(["mfed-trainer"], env=_s3_env(seaweed, init))
    assert done.returncode == 0, done.stdout + done.stderr
    assert _events(done.stdout)[-1]["event"] == "initialised"
    base = GlobalManifest.from_json(seaweed_object(seaweed, join(init.output, MANIFEST_FILE)))

    spec = RoundSpec(
        federation="fed",
        round=1,
        site="site-a",
        task=CLS.task,
        encoder=ArchSpec(name="small_cnn"),
        decoder=CLS.decoder,
        training=TrainingSpec(device="cpu"),
        # the demo data set inside the image (its Fashion-MNIST IDX files)
        data=DataSpec(shard_index=0, shard_count=8, samples=64, test_samples=50),
        global_model=init.output,
        previous_decoder=None,
        output=join(ROOT, "r1", "sites", "site-a"),
    )
    done = trainer.run(["mfed-trainer"], env=_s3_env(seaweed, spec))
    assert done.returncode == 0, done.stdout + done.stderr
    uploaded = _events(done.stdout)[-1]
    assert uploaded["event"] == "uploaded" and uploaded["site"] == "site-a"
    manifest = ContributionManifest.from_json(seaweed_object(seaweed, join(spec.output, MANIFEST_FILE)))
    assert manifest.base_digest == base.digest and manifest.samples == 51  # 64 minus 13 for validation
    assert manifest.metrics["steps"] == 2 and "test_before" in manifest.metrics  # 51 images, batch 32
    assert manifest.trainer["torch"] == constraints()["torch"] + "+cpu"

    # A bad spec is bad input (exit 2, podFailurePolicy FailJob), from inside the image too.
    broken = trainer.run(["mfed-trainer"], env={**_s3_env(seaweed, spec), "MFED_SPEC": "{not json"})
    assert broken.returncode == 2 and _events(broken.stdout)[-1]["kind"] == "bad-input"


def seaweed_object(s3: SeaweedFS, uri: str) -> bytes:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bytes(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())


def constraints() -> dict[str, str]:
    text = (REPO / "requirements" / "constraints.txt").read_text()
    return dict(line.split("==", 1) for line in text.split() if "==" in line)


def test_the_image_runs_as_uid_10001_and_cannot_write_its_own_files(trainer: Container) -> None:
    assert image_config(TRAINER)["User"] == "10001"
    who = trainer.run(["id", "-u"])
    assert who.stdout.strip() == "10001"
    write = trainer.run(["sh", "-c", "touch /opt/mfed/x || echo refused"])
    assert "refused" in write.stdout + write.stderr


def test_the_image_holds_the_constraints_versions_a_clean_pip_check_and_no_build_leftovers(
    trainer: Container,
) -> None:
    torch = trainer.run(["python", "-c", "import torch, numpy; print(torch.__version__, numpy.__version__)"])
    assert torch.returncode == 0, torch.stderr
    torch_version, numpy_version = torch.stdout.split()
    assert torch_version.split("+")[0] == constraints()["torch"] and numpy_version == constraints()["numpy"]
    check = trainer.run(["pip", "check"])
    assert check.returncode == 0 and "No broken requirements" in check.stdout, check.stdout + check.stderr
    leftovers = trainer.run(
        ["sh", "-c", "for p in gcc cc make g++; do command -v $p; done; ls -d /tmp/wheels /root/.cache/pip 2>/dev/null"]
    )
    assert leftovers.stdout.strip() == "", f"build tools or the wheelhouse in the image: {leftovers.stdout}"
    size = image_size_bytes(TRAINER)
    print(f"trainer image: {size / 2**20:.0f} MiB")  # reported in CI's output (-s) and the note
    assert size < 2 * 2**30  # the CPU torch wheel's ~800 MiB, Python and the venv
