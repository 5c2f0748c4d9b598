"""`mfed pilot -f DIR`: the pilot of the SiteTask and FederationRound manifests a cluster takes,
parsed by the operator's own code (mfed.resources), through the real trainer and aggregator.

The built-in scenarios are checked against their manifests under examples/ by an independent
oracle: the generated sites and plans of PilotConfig's scenarios (mfed.pilot.config), which the
manifests were written to match and which `mfed pilot --scenario` still runs.

What this does not check: that a real API server accepts these manifests (tests/operator's CRD
checks do) and a PVC mounted by a kubelet (here `--data` names a folder, as the claim's files)."""

from __future__ import annotations

import json
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from mfed.cli import main
from mfed.methods import Method
from mfed.pilot.config import SCENARIOS, PilotConfig
from mfed.pilot.manifests import DataPlaces, ManifestError, manifest_pilot, read_manifests, round_length
from mfed.pilot.runner import pilot_sites
from mfed.resources.method_settings import aggregation_settings, method_plan
from tests.unit.factories import write_image_folder

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize(
    ("directory", "scenario", "methods"),
    [("pilot-default", "equal", None), ("pilot-scarce", "scarce", (Method.LOCAL, Method.AUTO))],
)
def test_the_built_in_pilots_are_their_example_manifests(directory, scenario, methods):
    """`make pilot` runs -f examples/pilot-default/: the same sites, plans and steps as before."""
    chosen = {} if methods is None else {"methods": methods}
    from_manifests, notes = manifest_pilot(EXAMPLES / directory, DataPlaces(claims={}), **chosen)
    built_in = PilotConfig(scenario=scenario, **SCENARIOS[scenario], **chosen)
    assert notes == []
    assert from_manifests.methods == built_in.methods
    for seed in (0, 1, 4):  # the shards are drawn with the pilot's seed, as the built-in ones
        assert pilot_sites(from_manifests, seed) == pilot_sites(built_in, seed)
    for method in built_in.methods:
        assert from_manifests.plan(method) == built_in.plan(method)
        assert from_manifests.track_steps(method) == built_in.track_steps(method)
    same = ("rounds", "steps", "epochs", "batch_size", "learning_rate", "val_fraction", "encoder", "tasks", "seeds")
    assert {k: getattr(from_manifests, k) for k in same} == {k: getattr(built_in, k) for k in same}
    assert [from_manifests.task_definition(t) for t in built_in.tasks] == [
        built_in.task_definition(t) for t in built_in.tasks
    ]


@pytest.mark.parametrize("directory", ["pilot-default", "pilot-scarce", "fashion-mnist"])
def test_the_pilot_plans_the_rounds_method_as_the_operator_does(directory):
    """One reading of the manifest: the pilot's plan of the round's method is the operator's
    (method_plan, aggregation_settings), but for the round length, which the pilot fixes."""
    manifests = read_manifests(EXAMPLES / directory)
    config, _ = manifest_pilot(EXAMPLES / directory, DataPlaces(claims={}))
    r = manifests.round
    pilot = config.plan(r.training.method)
    assert replace(pilot, min_steps=0) == replace(method_plan(r), min_steps=0)
    assert pilot.aggregation == aggregation_settings(r)


def test_the_fashion_mnist_example_pilots_from_its_manifests(tmp_path, capsys):
    """The deployable example (kustomize dir with a Namespace and a Secret) runs as it is."""
    out = tmp_path / "out"
    chosen = ["--rounds", "2", "--methods", "local,m-fed", "--workers", "2"]
    code = main(["pilot", "-f", str(EXAMPLES / "fashion-mnist"), *chosen, "--no-progress", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr()
    assert "not piloted (no SiteTask or FederationRound): Namespace/mfed-demo, Secret/s3-credentials" in printed.err
    results = json.loads((out / "results.json").read_text())
    sites = ["cls10-a", "cls10-b", "coarse4-a", "coarse4-b", "denoise-a", "denoise-b", "rot4-a", "rot4-b"]
    assert sorted(results["config"]["sites"]) == sites
    assert results["config"]["source"] == str(EXAMPLES / "fashion-mnist")
    # 1 epoch over 240 training images of 32 = 8 steps a round (what each site's Job takes), 2 rounds
    for method in ("local", "mfed"):
        assert results["methods"][method]["site_steps"]["0"] == dict.fromkeys(sites, 16)
    assert results["config"]["sites"]["cls10-a"]["data"]["testSamples"] == 1000
    assert "M-Fed" in printed.out and (out / "metrics.png").stat().st_size > 0


def _image_folder_federation(root: Path, *, decoder_b: str = "mlp") -> Path:
    manifests = root / "manifests"
    manifests.mkdir()
    sites = []
    for site, seed, decoder in (("plant-a", 0, "mlp"), ("plant-b", 1, decoder_b)):
        write_image_folder(root / f"{site}-disk" / "train", per_class=12, seed=seed)
        write_image_folder(root / f"{site}-disk" / "test", per_class=4, seed=seed + 10)
        sites.append(
            textwrap.dedent(
                f"""\
                apiVersion: mfed.dev/v1alpha1
                kind: SiteTask
                metadata:
                  name: {site}
                  labels: {{line: parts}}
                spec:
                  federation: inspection
                  task: {{name: parts, type: classification, params: {{num_classes: 3}}}}
                  decoder: {{name: {decoder}}}
                  data:
                    pvc: {{claimName: {site}-images, path: train, testPath: test, format: image-folder}}
                """
            )
        )
    (manifests / "sites.yaml").write_text("---\n".join(sites))
    (manifests / "round.yaml").write_text(
        textwrap.dedent(
            """\
            apiVersion: mfed.dev/v1alpha1
            kind: FederationRound
            metadata: {name: inspection-r1}
            spec:
              federation: inspection
              siteSelector: {matchLabels: {line: parts}}
              encoder: {name: small_cnn}
              training: {method: m-fed, minSteps: 3, maxSteps: 3, batchSize: 8}
              storage: {bucket: mfed}
              initialModel: {seed: 0}
              followUpRounds: 1
            """
        )
    )
    return manifests


def _claims(root: Path) -> list[str]:
    return [arg for site in ("plant-a", "plant-b") for arg in ("--data", f"{site}-images={root / f'{site}-disk'}")]


def test_an_image_folder_federation_pilots_from_its_manifests(tmp_path):
    manifests = _image_folder_federation(tmp_path)
    out = tmp_path / "out"
    argv = ["pilot", "-f", str(manifests), *_claims(tmp_path), "--methods", "local,m-fed", "--workers", "0"]
    assert main([*argv, "--no-progress", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    data = results["config"]["sites"]["plant-a"]["data"]
    assert (data["source"], data["uri"]) == ("image-folder", str(tmp_path / "plant-a-disk" / "train"))
    assert results["tasks"] == {"parts": {"metric": "accuracy", "higher_is_better": True}}
    for method in ("local", "mfed"):  # minSteps = maxSteps = 3, 2 rounds (followUpRounds 1)
        assert results["methods"][method]["site_steps"]["0"] == {"plant-a": 6, "plant-b": 6}
        assert 0 <= results["methods"][method]["metrics"]["parts"] <= 100


def test_a_pvc_claim_without_a_local_folder_is_named_with_the_fix(tmp_path, capsys):
    manifests = _image_folder_federation(tmp_path)
    with pytest.raises(SystemExit):
        main(["pilot", "-f", str(manifests), "--no-progress", "--out", str(tmp_path / "out")])
    assert "SiteTask plant-a reads PVC claim plant-a-images: pass --data plant-a-images=PATH" in capsys.readouterr().err


def test_sites_that_disagree_on_a_decoder_are_refused_as_the_operator_refuses_them(tmp_path):
    manifests = _image_folder_federation(tmp_path, decoder_b="linear")
    with pytest.raises(
        ManifestError, match=r"DecoderMismatch: sites plant-a .* and plant-b .* disagree on the decoder"
    ):
        read_manifests(manifests)


def test_an_invalid_manifest_names_its_file_object_and_field(tmp_path):
    manifests = _image_folder_federation(tmp_path)
    (manifests / "round.yaml").write_text(
        (manifests / "round.yaml").read_text().replace("batchSize: 8", "batchSize: 0")
    )
    with pytest.raises(ManifestError, match=r"round.yaml: FederationRound inspection-r1: spec.training.batchSize"):
        read_manifests(manifests)


def test_a_directory_with_two_rounds_needs_round_and_a_built_in_flag_points_at_the_manifest_field(tmp_path, capsys):
    manifests = _image_folder_federation(tmp_path)
    second = (manifests / "round.yaml").read_text().replace("name: inspection-r1", "name: inspection-r9")
    (manifests / "round-9.yaml").write_text(second)
    with pytest.raises(ManifestError, match=r"2 FederationRounds \(inspection-r1, inspection-r9\); choose one"):
        read_manifests(manifests)
    assert read_manifests(manifests, "inspection-r9").round.name == "inspection-r9"
    with pytest.raises(SystemExit):
        main(["pilot", "-f", str(manifests), "--lr", "0.1", "--round", "inspection-r1"])
    assert (
        "--lr does not combine with -f: FederationRound spec.training.learningRate says it" in capsys.readouterr().err
    )


def test_sites_of_different_sizes_train_the_largest_sites_round_length_with_a_note():
    r = read_manifests(EXAMPLES / "fashion-mnist").round  # 1 epoch, batch 32, no min/max steps
    steps, note = round_length(r, {"a": 240, "b": 100})
    assert steps == 8  # ceil(240 / 32); b's Job would take ceil(100 / 32) = 4
    assert note is not None and "fewer (b 4)" in note and "minSteps = maxSteps" in note
    capped = replace(r, training=replace(r.training, max_steps=5))
    assert round_length(capped, {"a": 240, "b": 240}) == (5, None)


def test_a_list_of_objects_as_kubectl_get_writes_it_is_read_and_namespaces_must_agree(tmp_path):
    manifests = _image_folder_federation(tmp_path)
    sites = list(yaml.safe_load_all((manifests / "sites.yaml").read_text()))
    listed = {"apiVersion": "v1", "kind": "List", "items": sites}
    (manifests / "sites.yaml").write_text(yaml.safe_dump(listed))
    assert [s.name for s in read_manifests(manifests).sites] == ["plant-a", "plant-b"]
    for site in sites:
        site["metadata"]["namespace"] = "plant-floor"
    (manifests / "sites.yaml").write_text(yaml.safe_dump(listed))
    elsewhere = r"namespace \(none\) matches .*\(SiteTasks of that federation name namespace plant-floor\)"
    with pytest.raises(ManifestError, match=elsewhere):
        read_manifests(manifests)
