"""`mfed-operator` as a Pod runs it, for tests: in-cluster login from ServiceAccount files.

The only difference from the image's entrypoint: the kubernetes client's in-cluster loader
reads its token and CA from the module constants `SERVICE_TOKEN_FILENAME` and
`SERVICE_CERT_FILENAME` (in a Pod, /var/run/secrets/kubernetes.io/serviceaccount/); here
they point into the test's folder ($MFED_TEST_SERVICEACCOUNT_DIR). Everything else, including
`KUBERNETES_SERVICE_HOST`/`_PORT` and the absence of any kubeconfig, is as in a cluster.
"""

from __future__ import annotations

import os
import sys

from kubernetes.config import incluster_config
from mfed_operator.main import main

if __name__ == "__main__":
    folder = os.environ["MFED_TEST_SERVICEACCOUNT_DIR"]
    incluster_config.SERVICE_TOKEN_FILENAME = os.path.join(folder, "token")
    incluster_config.SERVICE_CERT_FILENAME = os.path.join(folder, "ca.crt")
    sys.exit(main())
