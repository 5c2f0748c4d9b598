"""Adapters around the Kubernetes API and the S3 data plane: timeouts, typed errors, no kopf."""
