"""One registry for every plugin kind: encoders, decoders and task types, built in or installed.

A plugin is a Python distribution that declares entry points; nothing is forked or patched:

    [project.entry-points."mfed.encoders"]
    patch_net = "my_package.encoders:patch_net"

Every kind is one `Kind` (a name for messages, an entry point group, the built-ins) in `KINDS`;
data set readers (`mfed.datasets`) are one too, called by mfed.learning.data through
`load("dataset", name)`. The pilot, the trainer Job and the operator's checks all resolve names
here, so they agree on what a name means.

This module imports no torch and never imports a plugin to list it: names come from the
installed distributions' entry-point metadata (`importlib.metadata`), and built-ins are
"module:attribute" strings imported only by `load`. That is what lets the operator (whose image
has no torch) refuse an unknown architecture before any Job starts, from the same metadata the
trainer later loads. A name may not be claimed twice: a plugin that reuses a built-in's name, or
two plugins with one name, make every lookup of that name fail, naming both claimants.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import import_module
from importlib.metadata import EntryPoint, entry_points
from typing import Any


@dataclass(frozen=True)
class Kind:
    """A plugin kind: what it is called in messages, its entry point group and its built-ins."""

    name: str
    group: str
    builtins: Mapping[str, str]  # name -> "module:attribute", imported only when used
    label: str = ""  # what messages call one ("task type"); the name when empty

    @property
    def what(self) -> str:
        return self.label or self.name


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind(
            "encoder",
            "mfed.encoders",
            {"small_cnn": "mfed.learning.encoders:small_cnn", "resnet": "mfed.learning.encoders:resnet"},
        ),
        Kind(
            "decoder",
            "mfed.decoders",
            {"mlp": "mfed.learning.decoders:mlp", "upsample": "mfed.learning.decoders:upsample"},
        ),
        Kind(
            "task",
            "mfed.tasks",
            label="task type",
            builtins={
                "classification": "mfed.learning.tasks:Classification",
                "label_map": "mfed.learning.tasks:LabelMap",
                "rotation": "mfed.learning.tasks:Rotation",
                "denoise": "mfed.learning.tasks:Denoise",
                "reconstruction": "mfed.learning.tasks:Reconstruction",
                "regression": "mfed.learning.tasks:Regression",
            },
        ),
        # Readers of a site's data: (spec, example shape, classes, *, val_fraction, split_seed) ->
        # SiteData; `spec.data.pvc.format` names one (npz is read by mfed.learning.data itself).
        Kind(
            "dataset",
            "mfed.datasets",
            label="data set format",
            builtins={
                "image-folder": "mfed.learning.image_folder:load_image_folder",
                "tar-shards": "mfed.learning.tar_shards:load_tar_shards",
            },
        ),
    )
}

DOCS = "docs/plugins.md"


class PluginError(ValueError):
    """A plugin name cannot be resolved; the message says what to install, rename or fix."""


class UnknownPlugin(PluginError):
    pass


class PluginConflict(PluginError):
    pass


class PluginLoadError(PluginError):
    pass


@dataclass(frozen=True)
class Entry:
    """Where a name comes from: a built-in (`distribution` None) or an installed entry point."""

    kind: str
    name: str
    target: str  # "module:attribute"; empty for a name only declared to the operator
    distribution: str | None = None
    version: str | None = None
    declared: bool = False  # known by declaration (MFED_OPERATOR_PLUGINS), not by metadata

    @property
    def builtin(self) -> bool:
        return self.distribution is None and not self.declared

    @property
    def package(self) -> str:
        """`name==version` of the distribution providing it ("mfed" for built-ins)."""
        if self.builtin:
            return "mfed"
        if self.declared or self.distribution is None:
            return "declared"
        return f"{self.distribution}=={self.version}" if self.version else self.distribution

    def describe(self) -> str:
        what = KINDS[self.kind].what if self.kind in KINDS else self.kind
        if self.builtin:
            return f"the built-in {what} {self.name!r}"
        if self.declared:
            return f"{what} {self.name!r} (declared to the operator, not installed here)"
        group = KINDS[self.kind].group if self.kind in KINDS else "?"
        return f"entry point '{self.name} = {self.target}' (group {group}) of {self.package}"


@dataclass(frozen=True)
class Listing:
    """Every name of one kind, and the names claimed more than once."""

    kind: Kind
    entries: Mapping[str, Entry]
    conflicts: Mapping[str, tuple[Entry, ...]] = field(default_factory=dict)

    def names(self) -> list[str]:
        return sorted(set(self.entries) | set(self.conflicts))

    def find(self, name: str) -> Entry:
        if name in self.conflicts:
            raise PluginConflict(_conflict_message(self.kind, name, self.conflicts[name]))
        entry = self.entries.get(name)
        if entry is None:
            raise UnknownPlugin(_unknown_message(self, name))
        return entry

    def problem(self, name: str) -> str | None:
        """Why `name` cannot be used (None: it can), without importing anything."""
        try:
            self.find(name)
        except PluginError as exc:
            return str(exc)
        return None


def _unknown_message(listing: Listing, name: str) -> str:
    kind = listing.kind
    available = ", ".join(
        n if listing.entries[n].builtin else f"{n} ({listing.entries[n].package})" for n in sorted(listing.entries)
    )
    return (
        f"unknown {kind.what} {name!r}: it is neither built in nor registered by an installed plugin "
        f"(entry point group {kind.group}); available: {available or 'none'}. If it comes from a plugin "
        f"package, install that package where this runs (pip install <package>; see {DOCS})"
    )


def _conflict_message(kind: Kind, name: str, claims: tuple[Entry, ...]) -> str:
    plugins = [c for c in claims if not c.builtin]
    what = " and ".join(c.describe() for c in claims)
    fix = " ".join(sorted({c.distribution or "?" for c in plugins}))
    return (
        f"{kind.what} name {name!r} is claimed more than once: {what}. A plugin may not replace a built-in "
        f"or another plugin: rename the entry point in the plugin's pyproject.toml, or uninstall one of "
        f"them (pip uninstall {fix})"
    )


def kind(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise PluginError(f"unknown plugin kind {name!r}; kinds: {', '.join(sorted(KINDS))}") from None


def _entry_of(k: Kind, ep: EntryPoint) -> Entry:
    dist = ep.dist
    return Entry(
        kind=k.name,
        name=ep.name,
        target=ep.value,
        distribution=dist.name if dist is not None else "(unknown distribution)",
        version=dist.version if dist is not None else None,
    )


@cache
def listing(kind_name: str) -> Listing:
    """All names of a kind (cached: call `refresh()` after installing a plugin in this process)."""
    k = kind(kind_name)
    claims: dict[str, list[Entry]] = {
        name: [Entry(kind=k.name, name=name, target=target)] for name, target in k.builtins.items()
    }
    seen: set[tuple[str, str | None]] = set()
    for ep in entry_points(group=k.group):
        entry = _entry_of(k, ep)
        # The same distribution found twice on sys.path (an editable and a regular install) is one claim.
        if (entry.name, entry.distribution) in seen:
            continue
        seen.add((entry.name, entry.distribution))
        claims.setdefault(entry.name, []).append(entry)
    entries = {name: c[0] for name, c in claims.items() if len(c) == 1}
    conflicts = {name: tuple(c) for name, c in claims.items() if len(c) > 1}
    return Listing(kind=k, entries=entries, conflicts=conflicts)


def refresh() -> None:
    """Forget what was discovered (after `pip install` of a plugin into the running interpreter)."""
    import importlib

    importlib.invalidate_caches()
    listing.cache_clear()
    _load_target.cache_clear()


def find(kind_name: str, name: str) -> Entry:
    return listing(kind_name).find(name)


def names(kind_name: str) -> list[str]:
    return listing(kind_name).names()


@cache
def _load_target(target: str) -> Any:
    module_name, _, attribute = target.partition(":")
    obj: Any = import_module(module_name)
    for part in filter(None, attribute.split(".")):
        obj = getattr(obj, part)
    return obj


def load(kind_name: str, name: str) -> Any:
    """Import what `name` refers to (a factory or a class). Raises PluginError naming the entry
    point and the distribution when it is unknown, claimed twice, or cannot be imported."""
    entry = find(kind_name, name)
    try:
        return _load_target(entry.target)
    except Exception as exc:  # ImportError, AttributeError, or whatever the plugin's import raises
        raise PluginLoadError(
            f"{entry.describe()} cannot be loaded: {type(exc).__name__}: {exc}; reinstall "
            f"{entry.package} with its dependencies where this runs"
        ) from exc


def provenance(kind_name: str, name: str) -> str | None:
    """`distribution==version` of a plugin's name, None for a built-in (recorded in manifests)."""
    entry = find(kind_name, name)
    return None if entry.builtin else entry.package


@dataclass(frozen=True)
class Catalog:
    """Every kind's listing, for checks that must not import plugins (the operator's)."""

    listings: Mapping[str, Listing]

    def problem(self, kind_name: str, name: str) -> str | None:
        listing_ = self.listings.get(kind_name)
        if listing_ is None:
            return f"unknown plugin kind {kind_name!r}"
        return listing_.problem(name)

    def conflicting(self, kind_name: str, name: str) -> bool:
        listing_ = self.listings.get(kind_name)
        return listing_ is not None and name in listing_.conflicts

    def claimants(self, kind_name: str, name: str) -> tuple[Entry, ...]:
        """Who claims a conflicting name (empty when it is not in conflict)."""
        listing_ = self.listings.get(kind_name)
        return listing_.conflicts.get(name, ()) if listing_ is not None else ()

    def known(self, kind_name: str) -> list[str]:
        listing_ = self.listings.get(kind_name)
        return sorted(listing_.entries) if listing_ is not None else []

    def with_declared(self, declared: Iterable[tuple[str, str]]) -> Catalog:
        """This catalog plus (kind, name) pairs known to exist elsewhere (the trainer image)."""
        listings = dict(self.listings)
        for kind_name, name in declared:
            current = listings[kind_name]
            if name in current.entries or name in current.conflicts:
                continue
            entry = Entry(kind=kind_name, name=name, target="", declared=True)
            listings[kind_name] = Listing(
                kind=current.kind, entries={**current.entries, name: entry}, conflicts=current.conflicts
            )
        return Catalog(listings=listings)


def builtin_catalog() -> Catalog:
    """The built-in names only (what a process without plugins knows)."""
    return Catalog(
        listings={
            k.name: Listing(kind=k, entries={n: Entry(kind=k.name, name=n, target=t) for n, t in k.builtins.items()})
            for k in KINDS.values()
        }
    )


def parse_declared(items: Iterable[str]) -> list[tuple[str, str]]:
    """`kind:name` items (e.g. from MFED_OPERATOR_PLUGINS) as (kind, name); PluginError if malformed."""
    out = []
    for item in items:
        kind_name, sep, name = item.strip().partition(":")
        if not sep or not name or kind_name not in KINDS:
            raise PluginError(f"{item!r} is not kind:name with kind one of {', '.join(sorted(KINDS))}")
        out.append((kind_name, name))
    return out


def discover_catalog(declared: Iterable[tuple[str, str]] = ()) -> Catalog:
    """Every installed name of every kind, plus `declared` (kind, name) pairs: names a process
    knows exist elsewhere (the trainer image) without having the plugin installed itself."""
    return Catalog(listings={k.name: listing(k.name) for k in KINDS.values()}).with_declared(declared)
