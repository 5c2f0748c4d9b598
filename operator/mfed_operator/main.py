"""`mfed-operator`: load the configuration once, then run kopf with our handlers."""

from __future__ import annotations

import sys

import kopf

from mfed_operator.config import ConfigError, OperatorConfig
from mfed_operator.handlers import register


def main(argv: list[str] | None = None) -> int:
    try:
        config = OperatorConfig.from_env()
    except ConfigError as exc:
        print(f"mfed-operator: invalid configuration: {exc}", file=sys.stderr)
        return 2
    kopf.configure(
        verbose=config.log_level == "DEBUG",
        quiet=config.log_level in ("WARNING", "ERROR"),
        log_format=kopf.LogFormat.JSON if config.log_format == "json" else kopf.LogFormat.PLAIN,
    )
    registry = kopf.OperatorRegistry()
    register(registry, config)
    kopf.run(
        registry=registry,
        standalone=True,  # one replica (Deployment strategy Recreate); no peering CRDs needed
        clusterwide=not config.watch_namespaces,
        namespaces=list(config.watch_namespaces),
        liveness_endpoint=config.liveness_endpoint,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
