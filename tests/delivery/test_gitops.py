"""The Argo CD health check (Lua) on sample KVCache statuses, run by Lua 5.1 like Argo CD's gopher-lua."""

from __future__ import annotations

from typing import Any

import lupa.lua51 as lua51
import pytest
import yaml

from .conftest import ROOT

HEALTH = ROOT / "deploy" / "argocd" / "health-kvcache.lua"


def health(obj: dict[str, Any]) -> tuple[str, str]:
    """Run the script as Argo CD does: a global ``obj`` (the live object), the returned table."""
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = to_lua(runtime, obj)
    result = runtime.execute(HEALTH.read_text())
    return str(result["status"]), str(result["message"])


def to_lua(runtime: Any, value: Any) -> Any:
    if isinstance(value, dict):
        return runtime.table_from({k: to_lua(runtime, v) for k, v in value.items()})
    if isinstance(value, list):
        return runtime.table_from([to_lua(runtime, v) for v in value])
    return value


def kvcache(generation: int = 3, observed: int | None = 3, **conditions: tuple[str, int]) -> dict[str, Any]:
    """A KVCache with conditions given as type=(status, observedGeneration)."""
    obj: dict[str, Any] = {
        "apiVersion": "kvcache.dev/v1alpha1",
        "kind": "KVCache",
        "metadata": {"name": "c", "generation": generation},
        "spec": {"replicas": 2},
    }
    status: dict[str, Any] = {
        "conditions": [
            {
                "type": t,
                "status": s,
                "observedGeneration": g,
                "reason": f"{t}Reason",
                "message": f"{t} says {s}",
            }
            for t, (s, g) in conditions.items()
        ]
    }
    if observed is not None:
        status["observedGeneration"] = observed
    obj["status"] = status
    return obj


CASES = [
    ("ready", kvcache(Ready=("True", 3), Progressing=("False", 3), Degraded=("False", 3)), "Healthy"),
    ("degraded wins", kvcache(Ready=("True", 3), Degraded=("True", 3)), "Degraded"),
    ("rolling out", kvcache(Ready=("False", 3), Progressing=("True", 3)), "Progressing"),
    ("not ready, stuck", kvcache(Ready=("False", 3), Progressing=("False", 3)), "Degraded"),
    ("new spec not yet observed", kvcache(generation=4, observed=3, Ready=("True", 3)), "Progressing"),
    ("no observedGeneration", kvcache(observed=None, Ready=("True", 3)), "Progressing"),
    ("stale Ready condition", kvcache(generation=4, observed=4, Ready=("True", 3)), "Progressing"),
    (
        "stale Degraded ignored",
        kvcache(generation=4, observed=4, Degraded=("True", 3), Ready=("True", 4)),
        "Healthy",
    ),
    ("no conditions yet", kvcache(), "Progressing"),
    ("settled", kvcache(Ready=("True", 3), Progressing=("False", 3)), "Healthy"),
]


def test_paused_cache_is_suspended() -> None:
    obj = kvcache(Ready=("True", 3))
    obj["status"]["conditions"].append(
        {"type": "Progressing", "status": "False", "reason": "ReconcilePaused", "message": "paused"}
    )
    assert health(obj) == ("Suspended", "paused")


@pytest.mark.parametrize(("case", "obj", "expected"), CASES, ids=[c[0] for c in CASES])
def test_health_check(case: str, obj: dict[str, Any], expected: str) -> None:
    status, message = health(obj)
    assert status == expected, f"{case}: {status} ({message})"
    assert message


def test_no_status_at_all_is_progressing() -> None:
    assert health({"metadata": {"name": "c", "generation": 1}, "spec": {}})[0] == "Progressing"


def test_degraded_message_is_the_conditions() -> None:
    assert health(kvcache(Degraded=("True", 3)))[1] == "Degraded says True"


def test_argocd_config_embeds_the_same_script() -> None:
    cm = yaml.safe_load((ROOT / "deploy" / "argocd" / "argocd-cm.yaml").read_text())
    assert cm["data"]["resource.customizations.health.kvcache.dev_KVCache"] == HEALTH.read_text()


def test_sample_application_and_flux_examples_parse() -> None:
    apps = list(yaml.safe_load_all((ROOT / "deploy" / "argocd" / "application.yaml").read_text()))
    assert {a["kind"] for a in apps} == {"Application"}
    assert apps[0]["spec"]["source"]["chart"] == "kvcache-operator"
    flux = list(yaml.safe_load_all((ROOT / "deploy" / "flux" / "kvcache.yaml").read_text()))
    kustomization = next(d for d in flux if d["kind"] == "Kustomization")
    assert {"apiVersion": "kvcache.dev/v1alpha1", "kind": "KVCache"} in [
        {k: h[k] for k in ("apiVersion", "kind")} for h in kustomization["spec"]["healthChecks"]
    ]
