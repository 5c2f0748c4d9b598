"""The torch side: encoders, decoders, task types, data, and the local M-Fed training loop."""
