"""Small synthetic global models, contributions, image folders and tar shards built with numpy
and Pillow (no torch)."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from mfed.aggregation.ownership import layout_global
from mfed.artifacts.layout import DECODER_FILE, DELTA_FILE, MODEL_FILE
from mfed.artifacts.manifest import ContributionManifest, FileRef, GlobalManifest, TaskGroupInfo
from mfed.artifacts.signature import Signature
from mfed.artifacts.tensorfile import StoredDtype, encode_tensors, sha256_hex
from mfed.methods import Method
from mfed.pilot.config import PilotConfig
from mfed.spec import ArchSpec, DataSpec, RoundSpec, SharingPolicy, TaskGroupSpec, TaskSpec, TrainingSpec

# Two real task groups (small CNN encoder) for trainer-level tests.
CLS = TaskGroupSpec(task=TaskSpec(name="cls10", type="classification"), decoder=ArchSpec(name="mlp"))
DENOISE = TaskGroupSpec(task=TaskSpec(name="denoise", type="denoise"), decoder=ArchSpec(name="upsample"))

ENCODER_SHAPES = {"encoder.stages.0.weight": (3, 4), "encoder.stages.0.bias": (3,), "encoder.stages.1.weight": (2, 3)}
DECODER_SHAPES = {"a": {"decoder.0.weight": (5, 2)}, "b": {"decoder.0.weight": (1, 2), "decoder.0.bias": (1,)}}


def random_arrays(shapes: Mapping[str, tuple[int, ...]], rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def make_base(
    sharing: SharingPolicy = SharingPolicy(), seed: int = 0, federation: str = "fed"
) -> tuple[GlobalManifest, dict[str, np.ndarray], bytes]:
    rng = np.random.default_rng(seed)
    encoder = random_arrays(ENCODER_SHAPES, rng)
    decoders = {task: random_arrays(shapes, rng) for task, shapes in DECODER_SHAPES.items()}
    tensors = layout_global(encoder, decoders, sharing)
    data = encode_tensors(tensors)
    manifest = GlobalManifest(
        federation=federation,
        round=0,
        model=FileRef(name=MODEL_FILE, sha256=sha256_hex(data), size=len(data)),
        encoder=ArchSpec(name="toy"),
        encoder_signature=Signature.of_arrays(encoder),
        sharing=sharing,
        tasks={
            task: TaskGroupInfo(
                type="toy",
                params={},
                decoder=ArchSpec(name="toy"),
                decoder_signature=Signature.of_arrays(decoders[task]),
            )
            for task in sorted(decoders)
        },
    )
    return manifest, dict(tensors), data


def make_contribution(
    base: GlobalManifest,
    site: str,
    task: str,
    samples: int,
    rng: np.random.Generator,
    *,
    round_number: int = 1,
    delta: dict[str, np.ndarray] | None = None,
    decoder: dict[str, np.ndarray] | None = None,
    delta_dtype: StoredDtype = StoredDtype.F32,
    metrics: Mapping[str, float] | None = None,
    start_mix: Mapping[str, float] | None = None,
) -> tuple[ContributionManifest, bytes, bytes, dict[str, np.ndarray], dict[str, np.ndarray]]:
    delta = delta if delta is not None else random_arrays(ENCODER_SHAPES, rng)
    decoder = decoder if decoder is not None else random_arrays(DECODER_SHAPES[task], rng)
    delta_bytes = encode_tensors(delta, float_dtype=delta_dtype)
    decoder_bytes = encode_tensors(decoder)
    manifest = ContributionManifest(
        federation=base.federation,
        round=round_number,
        site=site,
        task=task,
        task_type="toy",
        samples=samples,
        base_digest=base.digest,
        encoder_signature=base.encoder_signature.digest,
        decoder_signature=base.tasks[task].decoder_signature.digest,
        delta=FileRef(name=DELTA_FILE, sha256=sha256_hex(delta_bytes), size=len(delta_bytes)),
        decoder=FileRef(name=DECODER_FILE, sha256=sha256_hex(decoder_bytes), size=len(decoder_bytes)),
        delta_dtype=delta_dtype.value,
        metrics=dict(metrics or {}),
        start_mix=dict(start_mix or {}),
    )
    return manifest, delta_bytes, decoder_bytes, delta, decoder


def site_round_spec(
    root: Path, *, site: str, group: TaskGroupSpec, round_number: int, training: TrainingSpec, data: DataSpec
) -> RoundSpec:
    """A round of the small-CNN federation laid out under `root` (r<N>/global, r<N>/sites/<site>),
    starting from the previous round's model and, after round 1, the site's own last decoder."""
    previous = str(root / f"r{round_number - 1}" / "sites" / site / "decoder.safetensors") if round_number > 1 else None
    return RoundSpec(
        federation="fed",
        round=round_number,
        site=site,
        task=group.task,
        encoder=ArchSpec(name="small_cnn"),
        decoder=group.decoder,
        training=training,
        data=data,
        global_model=str(root / f"r{round_number - 1}" / "global"),
        previous_decoder=previous,
        output=str(root / f"r{round_number}" / "sites" / site),
    )


def tiny_pilot(**overrides: object) -> PilotConfig:
    """A pilot of seconds: 2 rounds, cls10 and denoise with 2 sites each, Local and M-Fed."""
    fields: dict[str, object] = {
        "rounds": 2,
        "steps": 6,
        "sites_per_task": 2,
        "samples_per_site": 48,
        "test_samples": 64,
        "tasks": ("cls10", "denoise"),
        "methods": (Method.LOCAL, Method.MFED),
        **overrides,
    }
    return replace(PilotConfig(), **fields)  # type: ignore[arg-type]


def class_image(value: int, rng: np.random.Generator) -> np.ndarray:
    """28x28 grey: a class-dependent brightness and stripe, plus noise (learnable)."""
    base = np.full((28, 28), 40 + 80 * value, dtype=np.float64)
    base[:, value * 9 : value * 9 + 6] = 250
    return np.clip(base + rng.normal(0, 20, (28, 28)), 0, 255).astype(np.uint8)


def write_image_folder(root: Path, per_class: int = 40, classes: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """One PNG sub-folder per class under `root`; returns key -> the pixels written."""
    rng = np.random.default_rng(seed)
    written = {}
    for c in range(classes):
        (root / f"class-{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = class_image(c, rng)
            key = f"class-{c}/{i:03d}.png"
            Image.fromarray(pixels, mode="L").save(root / key)
            written[key] = pixels
    return written


def png_bytes(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return out.getvalue()


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_tar_shards(
    root: Path, shards: int = 5, per_shard: int = 24, seed: int = 0
) -> dict[str, tuple[np.ndarray, int]]:
    """Samples `<shard>:<key>` -> (pixels, target), written as <key>.png + <key>.cls members."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:04d}.tar", "w") as archive:
            for i in range(per_shard):
                target = (s * per_shard + i) % 3
                pixels = class_image(target, rng)
                key = f"{s:04d}{i:04d}"
                add_member(archive, f"{key}.png", png_bytes(pixels))
                add_member(archive, f"{key}.cls", str(target).encode())
                written[f"shard-{s:04d}.tar:{key}"] = (pixels, target)
    return written


IMAGE_FOLDER_CASES = ["unreadable", "mode", "size", "label", "missing"]


def spoil_image_folder(root: Path, case: str) -> str:
    """Spoil one file (or the layout) the way a real data set goes wrong; returns what the
    message must name."""
    if case == "unreadable":
        (root / "class-1" / "005.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        return "class-1/005.png: unreadable image"
    if case == "mode":
        Image.new("RGB", (28, 28)).save(root / "class-0" / "007.png")
        return "class-0/007.png: image mode RGB, the encoder needs L"
    if case == "size":
        Image.new("L", (32, 30)).save(root / "class-2" / "001.png")
        return "class-2/001.png: image size 32x30, the encoder needs 28x28"
    if case == "label":
        (root / "class-3").mkdir()
        Image.new("L", (28, 28)).save(root / "class-3" / "000.png")
        return "class-3/000.png: target 3 is outside the task's classes 0..2"
    if case == "missing":
        (root / "index.csv").write_text("file,target\nclass-0/000.png,0\nclass-0/404.png,0\n")
        return "class-0/404.png: missing file (named by index.csv line 3)"
    raise AssertionError(case)


def spoil_tar_shards(root: Path, case: str) -> str:
    """Spoil one shard the way a real data set goes wrong; returns what the message must name."""
    if case == "empty":
        with tarfile.open(root / "shard-0009.tar", "w"):
            pass
        return "shard-0009.tar: empty shard"
    if case == "truncated":
        data = (root / "shard-0001.tar").read_bytes()
        (root / "shard-0001.tar").write_bytes(data[: len(data) // 2 + 100])
        return "shard-0001.tar: truncated archive"
    if case == "no-target":
        with tarfile.open(root / "shard-0008.tar", "w") as archive:
            add_member(archive, "lonely.png", png_bytes(np.zeros((28, 28), dtype=np.uint8)))
        return "shard-0008.tar:lonely: no .cls target"
    if case == "label":
        with tarfile.open(root / "shard-0008.tar", "w") as archive:
            add_member(archive, "far.png", png_bytes(np.zeros((28, 28), dtype=np.uint8)))
            add_member(archive, "far.cls", b"7")
        return "shard-0008.tar:far: target 7 is outside the task's classes 0..2"
    if case == "unreadable":
        with tarfile.open(root / "shard-0008.tar", "w") as archive:
            add_member(archive, "junk.png", b"not a png")
            add_member(archive, "junk.cls", b"1")
        return "shard-0008.tar:junk: unreadable image"
    raise AssertionError(case)


TAR_SHARD_CASES = ["empty", "truncated", "no-target", "label", "unreadable"]
