"""The pilot's attacking site: what it uploads is well-formed (the validator accepts it) and is
exactly -d or 100 d of what it trained; shuffled labels permute the training split only; the
pilot's flags refuse combinations that measure nothing."""

from __future__ import annotations

import numpy as np
import pytest

from mfed.aggregation.validate import check_tensors
from mfed.artifacts.layout import MANIFEST_FILE, join
from mfed.artifacts.manifest import ContributionManifest
from mfed.artifacts.tensorfile import decode_tensors, sha256_hex
from mfed.cli import config_from_args, main
from mfed.learning.data import SiteData, Split
from mfed.methods import Method
from mfed.pilot.attacks import SCALE_FACTOR, Attack, AttackKind
from mfed.pilot.config import PilotConfig, PilotConfigError
from mfed.storage import Storage
from tests.unit.factories import make_base, make_contribution, tiny_pilot


def _uploaded(tmp_path):
    base, tensors, _ = make_base()
    manifest, delta_bytes, decoder_bytes, delta, _ = make_contribution(base, "a-0", "a", 30, np.random.default_rng(0))
    storage, prefix = Storage(), str(tmp_path / "site")
    storage.write(join(prefix, manifest.delta.name), delta_bytes)
    storage.write(join(prefix, manifest.decoder.name), decoder_bytes)
    storage.write(join(prefix, MANIFEST_FILE), manifest.to_json().encode())
    return base, tensors, storage, prefix, delta


@pytest.mark.parametrize(("kind", "factor"), [(AttackKind.SCALE, SCALE_FACTOR), (AttackKind.SIGN_FLIP, -1.0)])
def test_a_tampered_upload_is_well_formed_and_is_the_scaled_delta(tmp_path, kind, factor):
    base, tensors, storage, prefix, delta = _uploaded(tmp_path)
    Attack(kind=kind, site="a-0").tamper(storage, prefix)
    manifest = ContributionManifest.from_json(storage.read(join(prefix, MANIFEST_FILE)))
    data = storage.read(join(prefix, manifest.delta.name))
    assert manifest.delta.sha256 == sha256_hex(data) and manifest.delta.size == len(data)
    stored = decode_tensors(data).tensors
    for key, value in delta.items():
        np.testing.assert_allclose(stored[key], factor * value, rtol=1e-6)
    # hostile, not malformed: the validator has no reason to refuse it
    check_tensors(manifest, data, storage.read(join(prefix, manifest.decoder.name)), base, tensors)


def test_shuffled_labels_permute_the_training_split_only():
    rng = np.random.default_rng(1)
    train = Split(x=rng.random((50, 1, 2, 2)).astype(np.float32), y=np.arange(50) % 10)
    val = Split(x=rng.random((5, 1, 2, 2)).astype(np.float32), y=np.arange(5))
    data = SiteData(train=train, val=val, test=None)
    attack = Attack(kind=AttackKind.SHUFFLED_LABELS, site="a-0")
    poisoned = attack.poison_data(data, seed=3)
    assert poisoned.val is val and poisoned.train.x is train.x
    assert sorted(poisoned.train.y.tolist()) == sorted(train.y.tolist())
    assert (poisoned.train.y != train.y).mean() > 0.5
    np.testing.assert_array_equal(poisoned.train.y, attack.poison_data(data, seed=3).train.y)
    assert Attack(kind=AttackKind.SCALE, site="a-0").poison_data(data, seed=3) is data


def test_the_pilot_refuses_attacks_and_defences_that_measure_nothing():
    with pytest.raises(PilotConfigError, match="not a pilot site"):
        PilotConfig(attack=Attack(kind=AttackKind.SCALE, site="cls10-9"))
    with pytest.raises(PilotConfigError, match="nobody would be left"):
        PilotConfig(sites_per_task=1, attack=Attack(kind=AttackKind.SCALE, site="cls10-0"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dp-noise", "1.0"], "--dp-noise and --clip go together"),
        (["--dp-noise", "1.0", "--clip", "-1"], "--clip must be"),
        (["--dp-noise", "1.0", "--clip", "1", "--methods", "local,auto"], "--dp-noise does not combine with auto"),
        (["--rule", "median", "--methods", "local,cagrad"], "--rule with cagrad"),
        (["--attack", "scale"], "--attack and --attack-site go together"),
    ],
)
def test_bad_pilot_flags_fail_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["pilot", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_pilot_flags_reach_the_federated_methods_only():
    import argparse

    from mfed.cli import _pilot_parser

    parser = argparse.ArgumentParser()
    _pilot_parser(parser.add_subparsers())
    args = parser.parse_args(["pilot", "--rule", "trimmed-mean", "--trim", "0.25", "--dp-noise", "0.5", "--clip", "2"])
    with pytest.raises(PilotConfigError, match="mean rule only"):
        config_from_args(args)  # DP and a robust rule do not combine
    args = parser.parse_args(
        ["pilot", "--dp-noise", "0.5", "--clip", "2", "--attack", "scale", "--attack-site", "rot4-1"]
    )
    config = config_from_args(args)
    assert config.attack == Attack(kind=AttackKind.SCALE, site="rot4-1")
    mfed = config.plan(Method.MFED).aggregation
    assert mfed.privacy is not None and (mfed.privacy.clip_norm, mfed.privacy.noise_multiplier) == (2.0, 0.5)
    assert config.plan(Method.LOCAL).aggregation.privacy is None  # Local shares nothing


def test_a_private_pilot_gives_the_same_numbers_for_the_same_seed_and_the_attacker_is_left_out(tmp_path):

    from mfed.pilot import run_pilot
    from mfed.privacy.settings import PrivacySettings

    config = tiny_pilot(
        privacy=PrivacySettings(clip_norm=0.5, noise_multiplier=1.0),
        attack=Attack(kind=AttackKind.SIGN_FLIP, site="cls10-1"),
    )
    one = run_pilot(config, tmp_path / "one", show_progress=False, workers=0)
    two = run_pilot(config, tmp_path / "two", show_progress=False, workers=0)
    assert "epsilon" in one["table"] and "cls10-1 attacks (sign-flip)" in one["table"]
    for results in (one, two):
        results.pop("seconds"), results.pop("table")
    assert one == two
    assert one["methods"]["mfed"]["site_steps"] == {"0": {"cls10-0": 6, "denoise-0": 6, "denoise-1": 6}}


def test_an_absent_site_trains_but_never_reaches_the_aggregation(tmp_path, monkeypatch):

    from mfed.pilot import run_pilot, runner

    seen: list[list[str]] = []
    real = runner.aggregate

    def spy(base, tensors, round_number, sources, settings, **kwargs):
        seen.append(sorted(s.site for s in sources))
        return real(base, tensors, round_number, sources, settings, **kwargs)

    monkeypatch.setattr(runner, "aggregate", spy)
    config = tiny_pilot(steps=4, attack=Attack(kind=AttackKind.ABSENT, site="cls10-1"))
    results = run_pilot(config, tmp_path, show_progress=False, workers=0)
    federated = [sites for sites in seen if len(sites) > 1]
    assert federated == [["cls10-0", "denoise-0", "denoise-1"]] * 2  # M-Fed, both rounds
    assert ["cls10-1"] in seen  # Local: its own federation of one still aggregates
    assert results["methods"]["mfed"]["site_steps"]["0"]["cls10-0"] == 4
    assert "cls10-1 never uploads (absent)" in results["table"]
