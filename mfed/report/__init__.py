"""`mfed report`: the pilot's table, JSON and learning-curve plot for a chain of
FederationRounds on a cluster, read through the Kubernetes API or from the artifacts in S3."""
