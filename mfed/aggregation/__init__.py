"""Pure, streaming M-Fed aggregation over numpy arrays (no torch, no I/O clients)."""
