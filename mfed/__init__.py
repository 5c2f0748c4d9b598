"""mfed: multi-task federated learning (M-Fed) across sites with different tasks and decoders."""

__version__ = "0.1.0"
