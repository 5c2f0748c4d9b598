"""The example plugin (examples/plugin, pip-installed into this venv) through the real paths:
model building, the initial model, a site's round, the pilot; and plugin-agnostic shapes
(feature maps, tabular inputs) end to end."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from mfed.artifacts.layout import MANIFEST_FILE, join
from mfed.cli import main
from mfed.learning.decoders import build_decoder
from mfed.learning.encoders import ArchError, build_encoder
from mfed.learning.model import build_site_model, part_state
from mfed.learning.shapes import DenseOutput, MapFeatures, VectorFeatures, VectorOutput
from mfed.model_store import read_global_model, write_global_model
from mfed.rounds.initial import init_global_model
from mfed.rounds.site_round import BadInput, run_site_round
from mfed.spec import (
    ArchSpec,
    DataSource,
    DataSpec,
    InitSpec,
    RoundSpec,
    SharingMode,
    SharingPolicy,
    TaskGroupSpec,
    TaskSpec,
    TrainingSpec,
)
from mfed.storage import Storage
from tests.support.plugin import install_example_plugin

PATCH = ArchSpec(name="patch_net", params={"width": 8, "depth": 1})
INSET = TaskGroupSpec(
    task=TaskSpec(name="inset", type="membership", params={"positives": [5, 7, 9]}),
    decoder=ArchSpec(name="pooled_head"),
)
DENOISE = TaskGroupSpec(task=TaskSpec(name="denoise", type="denoise"), decoder=ArchSpec(name="upsample"))


@pytest.fixture(scope="module", autouse=True)
def example_plugin() -> Iterator[None]:
    install_example_plugin()
    yield


def _init(root: Path, encoder: ArchSpec, groups: tuple[TaskGroupSpec, ...], sharing: SharingPolicy) -> InitSpec:
    spec = InitSpec(
        federation="fed", encoder=encoder, groups=groups, sharing=sharing, seed=3, output=str(root / "r0" / "global")
    )
    model_bytes, manifest = init_global_model(spec)
    write_global_model(Storage(), spec.output, model_bytes, manifest)
    return spec


def test_the_example_encoder_has_no_stages_and_builds_a_site_model_with_the_plugins_decoder_and_task() -> None:
    model, task = build_site_model(PATCH, INSET.task, INSET.decoder)
    names = list(part_state(model, "encoder"))
    assert not hasattr(model.encoder, "stages") and not any(".stages." in n for n in names)
    assert {n.split(".")[1] for n in names} == {"embed", "blocks"}
    assert model.encoder.feature_spec == MapFeatures(8, 7, 7)  # type: ignore[union-attr]
    assert tuple(model(torch.rand(5, 1, 28, 28)).shape) == (5, 1)
    assert task.metric_name == "accuracy" and type(task).__module__ == "mfed_example_plugin.tasks"


def test_depth_sharing_needs_stages_and_says_to_share_by_prefix_instead(tmp_path: Path) -> None:
    with pytest.raises(ArchError) as info:
        _init(tmp_path, PATCH, (INSET,), SharingPolicy(mode=SharingMode.DEPTH, depth=1))
    message = str(info.value)
    assert "sharing.mode depth needs an encoder that keeps its layers in `stages`" in message
    assert "use sharing.mode prefixes" in message and "embed." in message


def test_prefix_sharing_works_on_any_modules_parameter_names(tmp_path: Path) -> None:
    spec = _init(tmp_path, PATCH, (INSET, DENOISE), SharingPolicy(mode=SharingMode.PREFIXES, prefixes=("embed.",)))
    stored = read_global_model(Storage(), spec.output)
    keys = set(stored.tensors)
    assert {"encoder.embed.weight", "encoder.embed.bias"} <= keys  # shared across the two tasks
    assert "encoder.blocks.0.spatial.weight" not in keys
    assert {"tasks.inset.encoder.blocks.0.spatial.weight", "tasks.denoise.encoder.blocks.0.spatial.weight"} <= keys
    # The model records where its architecture comes from, for sites that lack the plugin.
    assert stored.manifest.plugins == {
        "decoder/pooled_head": "mfed-example-plugin==0.1.0",
        "encoder/patch_net": "mfed-example-plugin==0.1.0",
        "task/membership": "mfed-example-plugin==0.1.0",
    }


@pytest.mark.parametrize(
    ("encoder", "features"),
    [(PATCH, MapFeatures(8, 7, 7)), (ArchSpec(name="flat_mlp", params={"hidden": [64, 24]}), VectorFeatures(24))],
)
@pytest.mark.parametrize(
    ("decoder", "output"),
    [("mlp", VectorOutput(10)), ("pooled_head", VectorOutput(3)), ("upsample", DenseOutput((1, 28, 28)))],
)
def test_decoders_are_built_from_the_features_the_encoder_declares(encoder, features, decoder, output) -> None:
    built = build_encoder(encoder)
    assert built.feature_spec == features  # type: ignore[union-attr]
    head = build_decoder(ArchSpec(name=decoder), features, output)
    prediction = head(built(torch.rand(4, 1, 28, 28)))
    assert tuple(prediction.shape) == (4, *output.shape)
    if decoder == "mlp":  # a map is flattened: the first layer sees every feature
        first = next(m for m in head.modules() if isinstance(m, torch.nn.Linear))
        assert first.in_features == int(np.prod(features.shape))


def test_a_feature_map_that_cannot_grow_to_the_image_says_how_to_fix_it() -> None:
    coarse = build_encoder(ArchSpec(name="patch_net", params={"patch": 2}))  # a 14x14 map
    with pytest.raises(ArchError, match=r"14x14 feature map does not grow to the 28x28 output.*change 'steps'"):
        build_decoder(ArchSpec(name="upsample"), coarse.feature_spec, DenseOutput((1, 28, 28)))  # type: ignore[arg-type]
    assert build_decoder(ArchSpec(name="upsample", params={"steps": 1}), coarse.feature_spec, DenseOutput((1, 28, 28)))  # type: ignore[arg-type]


def _tabular(path: Path, n: int, features: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features)).astype(np.float32)
    y = (x[:, :4].sum(axis=1) * 0.5).astype(np.float32)  # a learnable target
    np.savez(path, x=x, y=y)
    return path


def test_a_tabular_site_trains_a_round_with_the_flat_mlp_encoder_and_wrong_rows_are_refused(tmp_path: Path) -> None:
    encoder = ArchSpec(name="flat_mlp", params={"input_shape": [16], "hidden": [32]})
    group = TaskGroupSpec(
        task=TaskSpec(name="score", type="regression", params={"target": "y"}), decoder=ArchSpec(name="mlp")
    )
    _init(tmp_path, encoder, (group,), SharingPolicy())

    def spec(data: Path, site: str) -> RoundSpec:
        return RoundSpec(
            federation="fed",
            round=1,
            site=site,
            task=group.task,
            encoder=encoder,
            decoder=group.decoder,
            training=TrainingSpec(epochs=3, learning_rate=1e-2),
            data=DataSpec(source=DataSource.NPZ, uri=str(data)),
            global_model=str(tmp_path / "r0" / "global"),
            previous_decoder=None,
            output=str(tmp_path / "r1" / "sites" / site),
        )

    result = run_site_round(spec(_tabular(tmp_path / "rows.npz", 200, 16, 0), "plant-a"), Storage())
    metrics = result.manifest.metrics
    assert metrics["val_after"] < metrics["val_before"]  # MAE went down: it learned from the rows
    with pytest.raises(BadInput, match=r"float32 of shape \(12,\).*consumes float32 of shape \(16,\)"):
        run_site_round(spec(_tabular(tmp_path / "narrow.npz", 50, 12, 1), "plant-b"), Storage())


def test_a_site_without_a_plugin_the_federation_uses_is_told_which_package_to_install(tmp_path: Path) -> None:
    spec = _init(tmp_path, PATCH, (INSET,), SharingPolicy())
    manifest_uri = join(spec.output, MANIFEST_FILE)
    body = json.loads(Path(manifest_uri).read_text())
    body["plugins"]["encoder/acme_net"] = "acme-models==2.1"  # as a federation built with it records
    Path(manifest_uri).write_text(json.dumps(body))
    missing = RoundSpec(
        federation="fed",
        round=1,
        site="site-a",
        task=INSET.task,
        encoder=ArchSpec(name="acme_net"),
        decoder=INSET.decoder,
        training=TrainingSpec(),
        data=DataSpec(shard_index=0, shard_count=8, samples=40, test_samples=0),
        global_model=spec.output,
        previous_decoder=None,
        output=str(tmp_path / "r1" / "sites" / "site-a"),
    )
    with pytest.raises(BadInput) as info:
        run_site_round(missing, Storage())
    message = str(info.value)
    assert "unknown encoder 'acme_net'" in message and "entry point group mfed.encoders" in message
    assert "encoder/acme_net from acme-models==2.1" in message and "pip install acme-models==2.1" in message


@pytest.mark.parametrize(
    ("encoder", "tasks"),
    [
        ('patch_net:{"width": 8, "depth": 1}', "inset,denoise"),
        ('flat_mlp:{"hidden": [64]}', "inset,rot4"),  # the deliberately different encoder, same path
    ],
)
def test_the_pilot_runs_a_federation_of_plugins(tmp_path: Path, capsys: pytest.CaptureFixture[str], encoder, tasks):
    code = main(
        [
            "pilot",
            "--quick",
            "--no-progress",
            "--encoder",
            encoder,
            "--tasks",
            tasks,
            "--task",
            'inset=membership:{"positives": [5, 7, 9]}',
            "--decoder",
            "inset=pooled_head",
            "--shared-layers",
            "prefix:embed." if encoder.startswith("patch") else "all",
            "--methods",
            "local,task_fedavg,mfed",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for method in ("local", "task_fedavg", "mfed"):
        metrics = results["methods"][method]["metrics"]
        assert set(metrics) == set(tasks.split(","))
        assert all(np.isfinite(v) for v in metrics.values())
    assert results["config"]["task_definitions"]["inset"]["decoder"]["name"] == "pooled_head"
    assert "inset (accuracy)" in capsys.readouterr().out


def test_the_pilot_says_what_to_fix_when_the_encoder_cannot_share_by_depth(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["pilot", "--quick", "--no-progress", "--encoder", "patch_net", "--tasks", "rot4", "--shared-layers", "1"]
    assert main([*args, "--methods", "local,mfed", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "sharing.mode depth needs an encoder that keeps its layers in `stages`" in err
    assert "Traceback" not in err
