"""The site trainer: what each Kubernetes Job runs (and what the local pilot calls in-process)."""
