"""The plugin registry: built-ins and entry points by name, for every kind, without torch.

Plugins here are real distributions found by the real importlib.metadata: a dist-info folder
(METADATA + entry_points.txt) on sys.path, what pip leaves in site-packages."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mfed import registry
from mfed.learning.encoders import ArchError, build_encoder, check_encoder
from mfed.spec import ArchSpec
from tests.support.plugin import fake_distribution

ENCODER_MODULE = """
    import torch
    from torch import nn
    from mfed.plugins import InputSpec, VectorFeatures

    def tiny(params):
        net = nn.Sequential(nn.Flatten(), nn.Linear(6, params.get("size", 3)))
        net.input_spec = InputSpec(shape=(2, 3))
        net.feature_spec = VectorFeatures(params.get("size", 3))
        return net

    def undeclared(params):
        return nn.Linear(4, 2)

    def lying(params):
        net = nn.Linear(4, 2)
        net.input_spec = InputSpec(shape=(4,))
        net.feature_spec = VectorFeatures(5)
        return net
"""


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    yield tmp_path
    for name in ("acme_enc", "acme_broken", "acme_other"):
        sys.modules.pop(name, None)
    monkeypatch.undo()
    registry.refresh()


def test_names_come_from_metadata_without_importing_torch_or_any_plugin() -> None:
    # The operator's image has no torch: listing and checking names must not need it.
    code = (
        "import sys; from mfed import registry; c = registry.discover_catalog(); "
        "assert c.problem('encoder', 'small_cnn') is None and c.problem('task', 'rotation') is None; "
        "assert 'unknown encoder' in c.problem('encoder', 'nope'); "
        "assert 'torch' not in sys.modules and 'mfed.learning' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_an_installed_plugin_builds_like_a_built_in_and_records_its_package(plugins: Path) -> None:
    fake_distribution(plugins, "acme-enc", {"mfed.encoders": {"tiny": "acme_enc:tiny"}}, {"acme_enc": ENCODER_MODULE})
    registry.refresh()
    assert "tiny" in registry.names("encoder") and "small_cnn" in registry.names("encoder")
    assert registry.provenance("encoder", "tiny") == "acme-enc==1.0"
    assert registry.provenance("encoder", "small_cnn") is None
    encoder = build_encoder(ArchSpec(name="tiny", params={"size": 4}))
    assert encoder.feature_spec.size == 4  # type: ignore[union-attr]


def test_an_unknown_name_lists_what_exists_and_where_plugins_come_from(plugins: Path) -> None:
    with pytest.raises(registry.UnknownPlugin) as info:
        registry.load("decoder", "transformer_head")
    message = str(info.value)
    assert "unknown decoder 'transformer_head'" in message
    assert "entry point group mfed.decoders" in message and "mlp" in message and "upsample" in message
    assert "pip install" in message


def test_a_plugin_may_not_take_a_built_in_name_and_the_message_names_the_entry_point_and_package(
    plugins: Path,
) -> None:
    fake_distribution(
        plugins,
        "acme-other",
        {"mfed.encoders": {"small_cnn": "acme_other:tiny", "own_name": "acme_other:tiny"}},
        {"acme_other": ENCODER_MODULE},
    )
    registry.refresh()
    with pytest.raises(registry.PluginConflict) as info:
        registry.load("encoder", "small_cnn")
    message = str(info.value)
    assert "the built-in encoder 'small_cnn'" in message
    assert "entry point 'small_cnn = acme_other:tiny' (group mfed.encoders) of acme-other==1.0" in message
    assert "pip uninstall acme-other" in message
    assert registry.load("encoder", "own_name").__name__ == "tiny"  # its other names still work
    catalog = registry.discover_catalog()
    assert catalog.conflicting("encoder", "small_cnn") and not catalog.conflicting("encoder", "own_name")


def test_two_plugins_with_one_name_conflict(plugins: Path) -> None:
    fake_distribution(
        plugins / "a", "acme-enc", {"mfed.encoders": {"tiny": "acme_enc:tiny"}}, {"acme_enc": ENCODER_MODULE}
    )
    fake_distribution(
        plugins / "b", "acme-other", {"mfed.encoders": {"tiny": "acme_other:tiny"}}, {"acme_other": ENCODER_MODULE}
    )
    sys.path[:0] = [str(plugins / "a"), str(plugins / "b")]
    try:
        registry.refresh()
        with pytest.raises(registry.PluginConflict, match=r"acme-enc==1\.0 and .*acme-other==1\.0"):
            registry.find("encoder", "tiny")
    finally:
        sys.path.remove(str(plugins / "a"))
        sys.path.remove(str(plugins / "b"))


def test_a_plugin_that_cannot_be_imported_names_its_entry_point_and_package(plugins: Path) -> None:
    fake_distribution(
        plugins,
        "acme-broken",
        {"mfed.tasks": {"broken": "acme_broken:Task"}},
        {"acme_broken": "import acme_dependency_that_is_not_installed\n"},
    )
    registry.refresh()
    with pytest.raises(registry.PluginLoadError) as info:
        registry.load("task", "broken")
    message = str(info.value)
    assert "entry point 'broken = acme_broken:Task' (group mfed.tasks) of acme-broken==1.0" in message
    assert "acme_dependency_that_is_not_installed" in message and "reinstall acme-broken==1.0" in message


def test_encoders_must_declare_their_input_and_features_and_tell_the_truth(plugins: Path) -> None:
    fake_distribution(
        plugins,
        "acme-enc",
        {"mfed.encoders": {"undeclared": "acme_enc:undeclared", "lying": "acme_enc:lying"}},
        {"acme_enc": ENCODER_MODULE},
    )
    registry.refresh()
    with pytest.raises(ArchError, match=r"must declare the input it consumes as `module.input_spec"):
        build_encoder(ArchSpec(name="undeclared"))
    with pytest.raises(ArchError, match=r"declares features of shape \(5,\) but produces \(2,\)"):
        build_encoder(ArchSpec(name="lying"))
    with pytest.raises(ArchError, match=r"returned int, not a torch\.nn\.Module"):
        check_encoder(3, "encoder 'x'")


def test_names_declared_to_the_operator_are_known_without_being_installed() -> None:
    catalog = registry.discover_catalog(registry.parse_declared(["encoder:elsewhere", "task:remote"]))
    assert catalog.problem("encoder", "elsewhere") is None and catalog.problem("task", "remote") is None
    assert catalog.problem("decoder", "elsewhere") is not None  # declared for one kind only
    with pytest.raises(registry.PluginError, match="kind:name"):
        registry.parse_declared(["model:x"])


def test_every_kind_has_its_own_entry_point_group_named_after_it() -> None:
    # Adding a kind (e.g. data sets, `mfed.datasets`) is one Kind in KINDS, with the same rules.
    assert {"encoder", "decoder", "task"} <= set(registry.KINDS)
    for name, kind in registry.KINDS.items():
        assert kind.name == name and kind.group == f"mfed.{name}s"
        for builtin in kind.builtins:  # the "module:attribute" strings stay true to the code
            assert callable(registry.load(name, builtin)), builtin
