"""Pure domain logic of the operator: no kopf, no Kubernetes client, no boto3, no I/O."""
