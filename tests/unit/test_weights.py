"""Pretrained weights in (`mfed import-weights`) and the site's model out (`mfed export`,
`mfed.load_site_model`), through the CLI and the trainer's own code on local folders."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import mfed
from mfed.aggregation.fedavg import AggregationSettings, ContributionSource, aggregate
from mfed.aggregation.ownership import task_view
from mfed.artifacts.layout import MANIFEST_FILE, join
from mfed.artifacts.manifest import ContributionManifest
from mfed.cli import main
from mfed.learning.model import build_site_model, load_part
from mfed.learning.train import evaluate
from mfed.methods import Method, plan_method
from mfed.model_store import read_global_model, write_global_model
from mfed.rounds.initial import init_global_model
from mfed.rounds.site_round import load_site_splits, prepare_start, run_site_round
from mfed.seeding import derive_seed
from mfed.spec import ArchSpec, DataSpec, InitSpec, RoundSpec, SharingPolicy, TrainingSpec
from mfed.storage import Storage
from mfed.weights.export import ExportError, export_site, load_site_bundle
from mfed.weights.mapping import Rule, map_weights
from tests.unit.factories import CLS, DENOISE, site_round_spec

CONFIG = {
    "federation": "fed",
    "method": "m-fed",
    "encoder": {"name": "small_cnn", "params": {}, "sharing": {"mode": "all"}},
    "tasks": [
        {"task": {"name": "cls10", "type": "classification"}, "decoder": {"name": "mlp"}},
        {"task": {"name": "denoise", "type": "denoise"}, "decoder": {"name": "upsample"}},
    ],
}
# A plain torch.nn model laid out nothing like mfed's: a backbone Sequential and a head.
RULES = [
    "backbone.0.=encoder.stages.0.0.",
    "backbone.2.=encoder.stages.1.0.",
    "backbone.5.=encoder.stages.2.1.",
    "head.=tasks.cls10.decoder.0.",
]


def plain_model(seed: int = 11) -> nn.ModuleDict:
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(1, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
    )
    return nn.ModuleDict({"backbone": backbone, "head": nn.Linear(128, 10)})


def _import(tmp_path: Path, checkpoint: Path, *extra: str, rules: list[str] = RULES) -> int:
    config = tmp_path / "model.json"
    config.write_text(json.dumps(CONFIG))
    args = ["import-weights", str(checkpoint), "--config", str(config), "--out", str(tmp_path / "imported")]
    for rule in rules:
        args += ["--map", rule]
    return main([*args, *extra])


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_weights_of_a_plain_torch_module_round_trip_bit_exactly_and_predict_the_same(tmp_path: Path, fmt) -> None:
    plain = plain_model()
    state = {k: v.contiguous() for k, v in plain.state_dict().items()}
    checkpoint = tmp_path / ("plain.safetensors" if fmt == "safetensors" else "plain.pt")
    if fmt == "safetensors":
        save_file(state, str(checkpoint))  # the safetensors library: an independent writer
    else:
        torch.save({"epoch": 3, "state_dict": state}, checkpoint)
    assert _import(tmp_path, checkpoint, *(["--key", "state_dict"] if fmt == "torch" else [])) == 0

    stored = read_global_model(Storage(), str(tmp_path / "imported"))
    for source, target in (
        ("backbone.0.weight", "encoder.stages.0.0.weight"),
        ("head.bias", "tasks.cls10.decoder.0.bias"),
    ):
        expected = state[source].numpy()
        assert stored.tensors[target].view(np.uint32).tobytes() == expected.view(np.uint32).tobytes()
    # The decoder the checkpoint did not fill keeps exactly its seeded initialisation.
    init = InitSpec(
        federation="fed",
        encoder=ArchSpec(name="small_cnn"),
        groups=(CLS, DENOISE),
        sharing=SharingPolicy(),
        seed=0,
        output="x",
    )
    seeded = read_tensors_of(init_global_model(init)[0])
    for key, value in seeded.items():
        if key.startswith("tasks.denoise.decoder."):
            np.testing.assert_array_equal(stored.tensors[key], value)
    assert stored.manifest.aggregation["importedTensors"] == len(state)

    model, _ = build_site_model(ArchSpec(name="small_cnn"), CLS.task, CLS.decoder)
    load_part(model, "encoder", task_view(stored.tensors, "cls10", "encoder"))
    load_part(model, "decoder", task_view(stored.tensors, "cls10", "decoder"))
    x = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), plain["head"](plain["backbone"](x)))


def read_tensors_of(model_bytes: bytes) -> dict[str, np.ndarray]:
    from mfed.artifacts.tensorfile import decode_tensors

    return dict(decode_tensors(model_bytes).tensors)


def test_a_checkpoint_that_does_not_fit_lists_every_unexpected_missing_and_misshaped_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = {k: v.contiguous() for k, v in plain_model().state_dict().items()}
    state["backbone.9.weight"] = torch.zeros(3)  # no model key
    state["head.weight"] = torch.zeros(5, 128)  # mis-shaped: the task has 10 classes
    del state["backbone.2.bias"]  # the encoder is loaded all or nothing
    state["aux.weight"] = torch.zeros(2)  # no rule
    checkpoint = tmp_path / "bad.safetensors"
    save_file(state, str(checkpoint))
    assert _import(tmp_path, checkpoint) == 2
    err = capsys.readouterr().err
    assert "aux.weight (no --map rule matches it)" in err
    assert "backbone.9.weight -> encoder.stages.1.0.weight" not in err  # the longest prefix wins
    assert "backbone.9.weight (no --map rule matches it)" in err
    assert "missing" in err and "encoder.stages.1.0.bias" in err
    assert "tasks.cls10.decoder.0.weight <- head.weight: checkpoint (5, 128), model (10, 128)" in err
    assert not (tmp_path / "imported").exists()  # nothing is written


def test_the_mapping_report_is_exact_on_a_small_case() -> None:
    targets = {"encoder.a": (2,), "encoder.b": (3,), "tasks.t.decoder.w": (1,), "tasks.u.decoder.w": (1,)}
    source = {"net.a": np.ones(2), "net.b": np.ones(4), "head.w": np.ones(1), "fc.w": np.ones(9)}
    rules = [Rule.parse(r) for r in ("net.=encoder.", "head.=tasks.t.decoder.", "fc.=")]
    values, report = map_weights(source, targets, rules)
    assert report.loaded == {"encoder.a": "net.a", "tasks.t.decoder.w": "head.w"}
    assert report.misshaped == ("encoder.b <- net.b: checkpoint (4,), model (3,)",)
    assert report.missing == () and report.unexpected == ()
    assert report.dropped == ("fc.w",) and report.seeded_parts == ("tasks.u.decoder",)
    assert values["encoder.a"].dtype == np.float32 and not report.ok


class Payload:
    """Unpickling this would create a file: a checkpoint must never get to run it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (Path(self.marker),))


def test_a_torch_checkpoint_with_objects_is_refused_without_running_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.pt"
    torch.save({"state_dict": plain_model().state_dict(), "extra": Payload(str(marker))}, checkpoint)
    assert _import(tmp_path, checkpoint, "--key", "state_dict") == 2
    assert "torch.load(weights_only=True) refused the checkpoint" in capsys.readouterr().err
    assert not marker.exists()
    nested = tmp_path / "nested.pt"
    torch.save({"epoch": 1, "state_dict": plain_model().state_dict()}, nested)
    assert _import(tmp_path, nested) == 2  # not a flat state dict: say which entry to pick
    assert "pick the state dict inside it with --key" in capsys.readouterr().err


# ------------------------------------------------------------------ export


def _aggregate(root: Path, round_number: int, sites: list[str], settings: AggregationSettings) -> None:
    storage = Storage()
    base = read_global_model(storage, str(root / f"r{round_number - 1}" / "global"))

    def source(site: str) -> ContributionSource:
        prefix = root / f"r{round_number}" / "sites" / site
        return ContributionSource(
            site=site,
            read_manifest=lambda: ContributionManifest.from_json((prefix / MANIFEST_FILE).read_bytes()),
            read_files=lambda m: ((prefix / m.delta.name).read_bytes(), (prefix / m.decoder.name).read_bytes()),
        )

    result = aggregate(base.manifest, base.tensors, round_number, [source(s) for s in sites], settings)
    write_global_model(storage, str(root / f"r{round_number}" / "global"), result.model_bytes, result.manifest)


SITES = {"cls10-a": (CLS, 0), "denoise-a": (DENOISE, 1)}


def _federation(root: Path, method: Method, rounds: int) -> dict[str, list[RoundSpec]]:
    """A two-site federation of `rounds` rounds through the trainer and the aggregator."""
    plan = plan_method(method)
    init = InitSpec(
        federation="fed",
        encoder=ArchSpec(name="small_cnn"),
        groups=(CLS, DENOISE),
        sharing=plan.sharing,
        seed=5,
        output=str(root / "r0" / "global"),
    )
    write_global_model(Storage(), init.output, *init_global_model(init))
    training = TrainingSpec(
        site_strategy=plan.site_strategy, decoder_source=plan.decoder_source, mu=plan.mu, regularizer=plan.regularizer
    )
    specs: dict[str, list[RoundSpec]] = {site: [] for site in SITES}
    for r in range(1, rounds + 1):
        for site, (group, shard) in SITES.items():
            data = DataSpec(shard_index=shard, shard_count=8, samples=80, test_samples=120)
            spec = site_round_spec(root, site=site, group=group, round_number=r, training=training, data=data)
            run_site_round(spec, Storage())
            specs[site].append(spec)
        _aggregate(root, r, sorted(SITES), plan.aggregation)
    return specs


def _test_metric(model: nn.Module, task, spec: RoundSpec) -> float:  # type: ignore[no-untyped-def]
    data = load_site_splits(spec.data, spec.site, spec.training.val_fraction, Storage())
    assert data.test is not None
    return evaluate(model, task, data.test, device=torch.device("cpu"), seed=derive_seed("test", spec.task.name))


def test_an_exported_model_reproduces_the_sites_test_metric_of_the_next_round_and_the_trainers_predictions(
    tmp_path: Path,
) -> None:
    specs = _federation(tmp_path, Method.MFED, rounds=2)
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "r1"), "--all-sites", "--out", str(out)]) == 0
    for site, (group, _) in SITES.items():
        bundle = load_site_bundle(out / f"{site}.json")
        assert bundle.config.round == 1 and bundle.config.track == "task" and bundle.config.task == group.task
        # Round 2's trainer scored exactly this model on the site's test data before training.
        round2 = ContributionManifest.from_json(Path(join(specs[site][1].output, MANIFEST_FILE)).read_bytes())
        assert _test_metric(bundle.model, bundle.task, specs[site][1]) == pytest.approx(
            round2.metrics["test_before"], abs=1e-9
        )
        # ... and predicts what the trainer's own start model of round 2 predicts.
        start = prepare_start(specs[site][1], Storage())
        x = torch.rand(8, 1, 28, 28)
        with torch.no_grad():
            assert torch.equal(mfed.load_site_model(out / f"{site}.safetensors")(x), start.model.eval()(x))


def test_a_two_track_site_exports_the_track_its_upload_says_it_deploys(tmp_path: Path) -> None:
    specs = _federation(tmp_path, Method.FALLBACK, rounds=1)
    for site in SITES:
        export = export_site(Storage(), str(tmp_path / "r1" / "global"), site)
        upload = ContributionManifest.from_json((tmp_path / "r1" / "sites" / site / MANIFEST_FILE).read_bytes())
        deployed = "shared" if upload.metrics["deploy_shared"] else "task"
        assert export.config.track == deployed
        next_spec = replace(
            specs[site][0],
            round=2,
            global_model=str(tmp_path / "r1" / "global"),
            previous_decoder=str(tmp_path / "r1" / "sites" / site / "decoder.safetensors"),
        )
        state = prepare_start(next_spec, Storage())
        assert state.shared is not None
        tracks = {"task": state.model.eval(), "shared": state.shared.model.eval()}
        x = torch.rand(4, 1, 28, 28)
        with torch.no_grad():
            assert torch.equal(export.model(x), tracks[deployed](x))
            assert not torch.equal(export.model(x), tracks["shared" if deployed == "task" else "task"](x))


def test_export_refuses_what_it_cannot_reproduce(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _federation(tmp_path, Method.MFED, rounds=1)
    with pytest.raises(ExportError, match="siteStrategy mix"):
        export_site(Storage(), str(tmp_path / "r1"), "cls10-a", site_strategy="mix")
    assert main(["export", str(tmp_path / "r1"), "--site", "rot4-z", "--out", str(tmp_path / "x")]) == 2
    assert "site rot4-z has no model in the round" in capsys.readouterr().err
    exported = tmp_path / "ok"
    assert main(["export", str(tmp_path / "r1"), "--site", "cls10-a", "--out", str(exported)]) == 0
    (exported / "cls10-a.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ExportError, match="does not match the SHA-256"):
        load_site_bundle(exported / "cls10-a")
