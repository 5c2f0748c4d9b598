"""SiteTask and FederationRound resources, parsed and turned into trainer settings without a
cluster: the operator reconciles with these, and `mfed pilot -f DIR` runs the same manifests
locally, so a pilot and a deployment cannot read one YAML two ways."""
