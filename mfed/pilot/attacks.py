"""One faulty or hostile site in the pilot, to measure what the aggregation rule lets through.

`sign-flip` and `scale` rewrite the encoder delta the site uploads (-d and 100 d) after it has
trained honestly; `shuffled-labels` trains it on a fixed random permutation of its training
labels (a site with a broken labelling pipeline). `absent` is not an attack but its floor: the
site trains and never uploads, so the run is the federation without it, the best any rule that
refuses the attacker can give the others. The attacker's own scores are left out of the table:
the question is what happens to everyone else.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

import numpy as np

from mfed.artifacts.layout import MANIFEST_FILE, join
from mfed.artifacts.manifest import ContributionManifest, FileRef
from mfed.artifacts.tensorfile import StoredDtype, decode_tensors, encode_tensors, sha256_hex
from mfed.learning.data import SiteData, Split
from mfed.storage import Storage

SCALE_FACTOR = 100.0


class AttackKind(StrEnum):
    SIGN_FLIP = "sign-flip"
    SCALE = "scale"
    SHUFFLED_LABELS = "shuffled-labels"
    ABSENT = "absent"


@dataclass(frozen=True, kw_only=True)
class Attack:
    kind: AttackKind
    site: str  # the attacking site, e.g. cls10-0

    def poison_data(self, data: SiteData, seed: int) -> SiteData:
        """The attacker's training split with its labels permuted (validation and test untouched)."""
        if self.kind is not AttackKind.SHUFFLED_LABELS:
            return data
        train = data.train
        if not isinstance(train, Split):
            raise ValueError("shuffled labels are simulated on data held in memory (the pilot's)")
        order = np.random.default_rng(seed).permutation(len(train))
        return replace(data, train=Split(x=train.x, y=train.y[order]))

    @property
    def withholds(self) -> bool:
        """The site's upload never reaches the aggregation."""
        return self.kind is AttackKind.ABSENT

    def tamper(self, storage: Storage, prefix: str) -> None:
        """Rewrite the attacker's uploaded delta (and its manifest's digest of it) in place."""
        if self.kind in (AttackKind.SHUFFLED_LABELS, AttackKind.ABSENT):
            return
        factor = -1.0 if self.kind is AttackKind.SIGN_FLIP else SCALE_FACTOR
        manifest = ContributionManifest.from_json(storage.read(join(prefix, MANIFEST_FILE)))
        delta = decode_tensors(storage.read(join(prefix, manifest.delta.name))).tensors
        data = encode_tensors({k: (factor * v.astype(np.float32)) for k, v in delta.items()})
        storage.write(join(prefix, manifest.delta.name), data)
        ref = FileRef(name=manifest.delta.name, sha256=sha256_hex(data), size=len(data))
        tampered = replace(manifest, delta=ref, delta_dtype=StoredDtype.F32.value)
        storage.write(join(prefix, MANIFEST_FILE), tampered.to_json().encode())
