"""The mfed Kubernetes operator: SiteTask and FederationRound reconciliation with kopf.

Layers (enforced by import-linter contracts in pyproject.toml):
    domain/    pure: parsing resources, planning a round, building Jobs; no kopf, no clients
    adapters/  the Kubernetes API and S3 data plane, wrapped with timeouts and typed errors
    executor   performs a plan's actions through the adapters
    handlers   thin kopf handlers that glue it together; main is the console entry point
"""
