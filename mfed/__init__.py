"""mfed: multi-task federated learning (M-Fed) across sites with different tasks and decoders."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from mfed.weights.export import load_site_model


def __getattr__(name: str) -> Any:
    # `mfed.load_site_model` without importing torch on `import mfed` (the operator imports mfed
    # and has no torch): the export module is loaded on first use.
    if name == "load_site_model":
        from mfed.weights.export import load_site_model

        return load_site_model
    raise AttributeError(f"module 'mfed' has no attribute {name!r}")


__all__ = ["__version__", "load_site_model"]
