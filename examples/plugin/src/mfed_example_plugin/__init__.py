"""An example mfed plugin (docs/plugins.md): encoders, a decoder and a task type, by entry point."""

__version__ = "0.1.0"
