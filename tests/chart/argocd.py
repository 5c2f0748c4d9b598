"""Runs the Argo CD health checks (deploy/argocd/*-health.lua) the way Argo CD does.

Argo CD runs health scripts in gopher-lua, a Lua 5.1 implementation: the resource is the global
`obj` (JSON decoded into tables, numbers as Lua numbers) and the script returns a table with
`status` and `message`. Here the same script runs in a real Lua 5.1 (lupa's bundled one), with
the resource converted the same way, in a fresh runtime per call (no state leaks between calls).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lupa.lua51 as lua51

from tests.chart.tools import DEPLOY

SCRIPTS = {
    "FederationRound": DEPLOY / "argocd" / "federationround-health.lua",
    "SiteTask": DEPLOY / "argocd" / "sitetask-health.lua",
}
# The statuses Argo CD knows (anything else is an error in Argo CD).
ARGO_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


@dataclass(frozen=True)
class Health:
    status: str
    message: str


def _to_lua(runtime: Any, value: Any) -> Any:
    if isinstance(value, Mapping):
        return runtime.table_from({k: _to_lua(runtime, v) for k, v in value.items()})
    if isinstance(value, list):
        return runtime.table_from([_to_lua(runtime, v) for v in value])
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)  # gopher-lua numbers are float64
    raise TypeError(f"not JSON: {value!r}")


def health(kind: str, obj: Mapping[str, Any], script: Path | None = None) -> Health:
    runtime = lua51.LuaRuntime(unpack_returned_tuples=False, register_eval=False)
    runtime.globals().obj = _to_lua(runtime, obj)
    code = (script or SCRIPTS[kind]).read_text()
    result = runtime.execute(code)
    assert result is not None, f"{kind} health script returned nothing"
    status, message = result["status"], result["message"]
    assert status in ARGO_STATUSES, f"{kind} health script returned status {status!r}"
    assert isinstance(message, str) and message, f"{kind} health script returned no message"
    return Health(status=status, message=message)
