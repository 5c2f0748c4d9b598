"""Encoder signatures and the JSON manifests that describe every artifact."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from mfed.artifacts.manifest import ContributionManifest, GlobalManifest, ManifestError
from mfed.artifacts.signature import Signature, SignatureMismatch
from tests.unit.factories import make_base, make_contribution


def test_signature_mismatch_names_the_first_differing_parameter():
    a = Signature.of([("encoder.b", (2, 3), "float32"), ("encoder.a", (4,), "float32"), ("encoder.c", (1,), "float32")])
    b = Signature.of([("encoder.b", (3, 2), "float32"), ("encoder.a", (4,), "float32"), ("encoder.c", (2,), "float32")])
    with pytest.raises(SignatureMismatch) as info:
        a.require_equal(b)
    assert info.value.param == "encoder.b" and "[3, 2]" in str(info.value)


@pytest.mark.parametrize(
    ("candidate", "param", "words"),
    [
        ([("encoder.a", (4,), "float32")], "encoder.b", "missing"),
        (
            [("encoder.a", (4,), "float32"), ("encoder.b", (2,), "float32"), ("encoder.z", (1,), "float32")],
            "encoder.z",
            "not expected",
        ),
        ([("encoder.a", (4,), "float16"), ("encoder.b", (2,), "float32")], "encoder.a", "dtype"),
    ],
)
def test_signature_mismatch_reports_missing_extra_and_dtype(candidate, param, words):
    expected = Signature.of([("encoder.a", (4,), "float32"), ("encoder.b", (2,), "float32")])
    with pytest.raises(SignatureMismatch) as info:
        expected.require_equal(Signature.of(candidate))
    assert info.value.param == param and words in str(info.value)


def test_signature_digest_depends_on_structure_only():
    a = Signature.of_arrays({"x": np.zeros((2, 3), np.float32)})
    b = Signature.of_arrays({"x": np.ones((2, 3), np.float32)})
    c = Signature.of_arrays({"x": np.ones((3, 2), np.float32)})
    assert a.digest == b.digest != c.digest
    assert Signature.from_json(json.loads(json.dumps(a.to_json()))) == a


def test_contribution_manifest_round_trips_through_json():
    base, _, _ = make_base()
    manifest = make_contribution(base, "site-1", "a", 12, np.random.default_rng(0), metrics={"val_after": 81.5})[0]
    again = ContributionManifest.from_json(manifest.to_json())
    assert again == manifest
    assert json.loads(manifest.to_json())["format"] == "mfed.dev/contribution"


def test_global_manifest_round_trips_through_json():
    base, _, _ = make_base()
    assert GlobalManifest.from_json(base.to_json()) == base


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(formatVersion=99), "formatVersion"),
        (lambda d: d.update(format="something/else"), "format"),
        (lambda d: d["delta"].update(sha256="xyz"), "delta.sha256"),
        (lambda d: d["delta"].update(name="../../etc/passwd"), "delta.name"),
        (lambda d: d["metrics"].update(val_after=float("nan")), "metrics.val_after"),
        (lambda d: d.pop("baseDigest"), "baseDigest"),
    ],
)
def test_malformed_manifests_fail_naming_the_field(mutate, field):
    base, _, _ = make_base()
    manifest = make_contribution(base, "s", "a", 3, np.random.default_rng(0), metrics={"val_after": 1.0})[0]
    body = json.loads(manifest.to_json())
    mutate(body)
    with pytest.raises(ManifestError) as info:
        ContributionManifest.from_json(json.dumps(body, allow_nan=True))
    assert info.value.path == field


def test_manifest_that_is_not_json_is_a_manifest_error():
    with pytest.raises(ManifestError, match="not valid JSON"):
        ContributionManifest.from_json(b"\x80\x04pickle")


def test_global_manifest_digest_is_the_model_file_checksum():
    base, _, data = make_base()
    import hashlib

    assert base.digest == hashlib.sha256(data).hexdigest()
    assert dataclasses.replace(base, round=3).digest == base.digest
