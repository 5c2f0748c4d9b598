"""Where artifacts live: file names inside an artifact prefix, and the federation's tree.

One definition for the pilot (local directories), the trainer and the operator (S3 keys):

    <root>/<federation>/<round>/global/{model.safetensors,manifest.json}
    <root>/<federation>/<round>/sites/<site>/{delta.safetensors,decoder.safetensors,manifest.json}
"""

from __future__ import annotations

MODEL_FILE = "model.safetensors"
DELTA_FILE = "delta.safetensors"
DECODER_FILE = "decoder.safetensors"
MANIFEST_FILE = "manifest.json"
# Written by a site whose trainer refused its input (exit code 2) instead of a contribution: why,
# in words that name the file and the problem, for the operator to put in the site's status.
FAILURE_FILE = "failure.json"


def join(prefix: str, *parts: str) -> str:
    """Join URI or path parts with single slashes (works for s3:// and local paths)."""
    out = prefix.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def round_prefix(root: str, federation: str, round_name: str) -> str:
    return join(root, federation, round_name)


def global_prefix(round_prefix_: str) -> str:
    return join(round_prefix_, "global")


def site_prefix(round_prefix_: str, site: str) -> str:
    return join(round_prefix_, "sites", site)
