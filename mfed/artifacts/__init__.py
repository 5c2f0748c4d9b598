"""Self-describing artifacts: safetensors tensor files plus JSON manifests (no pickle, ever)."""
