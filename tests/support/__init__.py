"""Shared test infrastructure: a Kubernetes API emulator, a test kubelet, a SeaweedFS server."""
