"""Every mistake refused before it reaches a pod, in words, with the field named, by every path alike.

The corpus (tests/api/invalid/*.yaml) holds wrong and hostile KVCaches. Each file says which field it
breaks (``# field:``), words the refusal must contain (``# expect:``) and which part of a real API
server refuses it (``# layer:``): ``cel`` for the CRD's schema and CEL rules, ``webhook`` for what only
the operator's validating webhook can check. Each one goes through ``render``, ``validate``, the CRD
(schema + CEL with cel-python), the webhook's AdmissionReview answer and the operator's InvalidSpec
status; the words are the same on every Python path.
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import celpy
import kubernetes.utils
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcache_operator import admission, api, status, validation
from kvcache_operator.cli import main
from tests.api import helpers as h

CORPUS = sorted(h.INVALID.glob("*.yaml"))

# A message that shows a pattern instead of words: anchors, classes with ranges, escapes, groups.
REGEX_FRAGMENT = re.compile(r"\^|\$['\")]|\[[^\]\s]*-[^\]\s]*\]|\\[dswSW.]|\(\?|\]\*|\]\+|\.\*|\{\d+,")


def _header(path: Path, key: str) -> str:
    for line in path.read_text().splitlines():
        if line.startswith(f"# {key}: "):
            return line.split(": ", 1)[1]
    raise AssertionError(f"{path.name} has no '# {key}:' header")


def _in_words(text: str) -> None:
    assert not REGEX_FRAGMENT.search(text), f"a pattern in the message: {text}"
    assert "Traceback" not in text and 'File "' not in text, text


def _refusal(obj: dict[str, Any]) -> str:
    with pytest.raises(api.SpecError) as info:
        api.parse_kvcache(obj)
    return str(info.value)


def test_the_corpus_has_at_least_sixty_wrong_specs_on_both_layers() -> None:
    layers = [_header(p, "layer") for p in CORPUS]
    assert len(CORPUS) >= 60
    assert layers.count("cel") >= 20 and layers.count("webhook") >= 20


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_every_path_refuses_in_words_naming_the_field(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    field, expect, layer = _header(path, "field"), _header(path, "expect"), _header(path, "layer")
    obj = h.load_yaml(path)

    # the operator's validation (render, validate, the webhook and reconcile all run it)
    message = _refusal(obj)
    assert expect in message and field in message, message
    for line in message.splitlines():
        assert line.startswith(("spec.", "metadata.")), line
        _in_words(line)

    # the API server: the CRD's schema + CEL, or else the webhook (a real one runs both)
    server = h.server_errors(obj)
    if layer == "cel":
        assert server, "the CRD's schema and CEL rules accept it"
        assert any(field in e or field.rsplit(".", 1)[0] in e for e in server), server
        for error in server:
            _in_words(error)
    else:
        assert layer == "webhook" and server == [], f"CEL catches it (say layer: cel): {server}"
    assert h.admission_errors(obj) == message.splitlines()

    # the webhook's answer to a real AdmissionReview
    answer = admission.response(_admission_review(obj))["response"]
    assert answer["allowed"] is False and answer["status"] == {"code": 422, "message": message}

    # the operator without a webhook: Degraded/InvalidSpec with the same words
    degraded = status.invalid_spec_status({}, message, generation=2, now="2026-01-01T00:00:00Z")
    assert next(c for c in degraded["conditions"] if c["type"] == "Degraded")["message"] == message

    # render and validate, offline
    assert main(["render", "-f", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert main(["validate", "-f", str(path)]) == 1
    out = capsys.readouterr().out
    assert all(f"{path}: KVCache bad: {line}" in out or line in out for line in message.splitlines()), out


def _admission_review(obj: dict[str, Any], operation: str = "CREATE", old: Any = None) -> dict[str, Any]:
    """An AdmissionReview as the API server sends it for a KVCache."""
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "kvcache.dev", "version": "v1alpha1", "kind": "KVCache"},
            "resource": {"group": "kvcache.dev", "version": "v1alpha1", "resource": "kvcaches"},
            "requestKind": {"group": "kvcache.dev", "version": "v1alpha1", "kind": "KVCache"},
            "requestResource": {"group": "kvcache.dev", "version": "v1alpha1", "resource": "kvcaches"},
            "name": obj["metadata"]["name"],
            "namespace": "team-a",
            "operation": operation,
            "userInfo": {"username": "alice", "groups": ["system:authenticated"]},
            "object": obj,
            "oldObject": old,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


# --- the webhook's answers --------------------------------------------------------------------------


def test_admission_review_allows_a_valid_kvcache_with_warnings() -> None:
    obj = h.make_kvcache({"cache": {"enablePrefetch": True, "maxTokens": 1000, "pinMemory": True}})
    answer = admission.response(_admission_review(obj))
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    assert answer["response"]["allowed"] is True and "status" not in answer["response"]
    assert answer["response"]["warnings"] == [
        "spec.cache.enablePrefetch does nothing on CPU engines (resources.gpus is 0)",
        "spec.cache.pinMemory does nothing on CPU engines (resources.gpus is 0)",
        "spec.cache.maxTokens 1000 is not a multiple of spec.cache.blockTokens 16: "
        "the engines budget whole blocks, 992 tokens",
    ]
    assert admission.response(_admission_review(h.load_sample("minimal.yaml")))["response"] == {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "allowed": True,
    }


def test_admission_review_denies_listing_every_problem() -> None:
    obj = h.make_kvcache(
        {"persistence": {"enabled": True, "size": "-5Gi"}, "metrics": {"scrapeInterval": "0s"}}
    )
    answer = admission.response(_admission_review(obj))["response"]
    assert answer["allowed"] is False and answer["status"]["code"] == 422
    assert answer["status"]["message"].splitlines() == [
        'spec.persistence.size: "-5Gi" is not a size; use a Kubernetes quantity such as 20Gi',
        'spec.metrics.scrapeInterval: "0s" is out of range: the scrape interval must be between 1s and 1h',
    ]


def test_an_update_that_keeps_the_spec_is_allowed_even_when_the_spec_is_invalid() -> None:
    """Objects stored before the webhook existed stay deletable (finalizers) and pausable."""
    bad = h.load_yaml(h.INVALID / "29-size-negative.yaml")
    touched = {**bad, "metadata": {**bad["metadata"], "finalizers": []}}
    assert admission.response(_admission_review(touched, "UPDATE", old=bad))["response"]["allowed"] is True
    changed = {**bad, "spec": {**bad["spec"], "replicas": 2}}
    assert admission.response(_admission_review(changed, "UPDATE", old=bad))["response"]["allowed"] is False
    assert admission.review({"operation": "DELETE", "object": None, "oldObject": bad}).allowed


def test_warnings_for_gpus_the_engine_does_not_use_and_a_volume_smaller_than_the_pool() -> None:
    spec = api.parse_spec(
        {
            "cache": {"device": "cpu", "numLayers": 32, "numKvHeads": 8, "headDim": 128, "maxTokens": 65536},
            "resources": {"gpus": 2},
            "persistence": {"enabled": True, "size": "1Gi"},
        }
    )
    assert api.spec_warnings(spec) == [
        "spec.resources.gpus asks for 2 GPU(s) per pod that the engine does not use: "
        "spec.cache.device is cpu",
        "spec.persistence.size 1Gi is smaller than a full pool (8Gi): once the cache fills, persisting it to "
        "the volume fails",
    ]


# --- validate: offline, every problem at once ---------------------------------------------------------


def test_validate_lists_every_problem_of_every_file_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: other}\n---\n"
        + (h.INVALID / "33-cpu-limit-below-request.yaml").read_text()
        + "---\n"
        + (h.SAMPLES / "minimal.yaml").read_text()
    )
    code = main(["validate", "-f", str(mixed), "-f", str(h.INVALID / "62-scrape-interval-two-hours.yaml")])
    out = capsys.readouterr().out.splitlines()
    assert code == 1
    assert out == [
        f'{mixed}: KVCache bad: spec.resources.cpuLimit: "500m" is below spec.resources.cpu "2"; '
        "a limit must be at least the request",
        f"{h.INVALID / '62-scrape-interval-two-hours.yaml'}: KVCache bad: spec.metrics.scrapeInterval: "
        '"2h" is out of range: the scrape interval must be between 1s and 1h',
        "3 KVCache(s) checked: 2 invalid (2 problem(s)), 0 warning(s)",
    ]


def test_validate_accepts_the_samples(capsys: pytest.CaptureFixture[str]) -> None:
    files = [str(h.SAMPLES / name) for name in h.KVCACHE_SAMPLES]
    assert main(["validate", *(arg for f in files for arg in ("-f", f))]) == 0
    assert capsys.readouterr().out.endswith(
        f"{len(files)} KVCache(s) checked: 0 invalid (0 problem(s)), 0 warning(s)\n"
    )


def test_validate_reports_a_wrong_api_version_and_broken_yaml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("apiVersion: kvcache.dev/v1\nkind: KVCache\nmetadata: {name: a}\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: [KVCache\n")
    assert main(["validate", "-f", str(wrong), "-f", str(broken)]) == 1
    out = capsys.readouterr().out
    assert f"{wrong}: KVCache a: apiVersion: 'kvcache.dev/v1' is not served; use kvcache.dev/v1alpha1" in out
    assert f"{broken}: file: not valid YAML" in out


# --- quantities: Kubernetes' grammar, the kubernetes client's values -----------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1Gi", 2**30),
        ("512Mi", 512 * 2**20),
        ("1.5G", Decimal("1.5e9")),
        ("100m", Decimal("0.1")),
        ("2", 2),
        ("1e3", 1000),
        ("1E", 10**18),
        ("1Ei", 2**60),
        (".5", Decimal("0.5")),
        ("+1.", 1),
        ("0.1m", Decimal("0.0001")),
        ("-1", -1),
    ],
)
def test_parse_quantity_gives_the_kubernetes_clients_exact_values(text: str, value: Any) -> None:
    assert api.parse_quantity(text) == Decimal(value) == kubernetes.utils.parse_quantity(text)


@pytest.mark.parametrize(
    "text",
    ["", "1.2.3", "5KiMi", "ten gigs", "1K", "1ki", "1e", "+", ".", " 5", "5 ", "1_000", "NaN", "0x10"],
)
def test_parse_quantity_refuses_what_the_api_server_refuses(text: str) -> None:
    with pytest.raises(validation.QuantityError):
        api.parse_quantity(text)


_QUANTITY_TEXT = st.text(alphabet="0123456789.+-eEinumkKMGTP_ x", min_size=0, max_size=8)


@settings(max_examples=300, deadline=None)
@given(text=_QUANTITY_TEXT)
def test_the_crds_quantity_rule_and_the_parser_agree(text: str) -> None:
    program = _cel(validation.QUANTITY_CEL)
    assert bool(program.evaluate({"self": celpy.json_to_cel(text)})) == (
        validation.quantity_or_none(text) is not None
    )
    value = validation.quantity_or_none(text)
    if value is not None:  # what we accept, the kubernetes client reads to the same value
        assert kubernetes.utils.parse_quantity(text) == value


# --- every rule with CEL says the same as Python ------------------------------------------------------


def _cel(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


_FIELD_RULES = [
    (name, rule)
    for name, kind in vars(api).items()
    if name[0].isupper() and getattr(kind, "__metadata__", None)
    for meta in kind.__metadata__
    if isinstance(meta, api.Checked)
    for rule in meta.rules
    if rule.cel is not None
]


def test_every_checked_field_type_is_covered() -> None:
    covered = {name for name, _ in _FIELD_RULES}
    assert covered >= {"CpuQuantity", "MemoryQuantity", "VolumeSize", "CronSchedule", "ScrapeInterval"}
    assert covered >= {"ClaimName", "SecretName", "ModelPath", "NamespaceName", "ExtendedResourceName"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.one_of(
        st.text(alphabet="0123456789abcdefgAZ.-/_ *@?,smhKMGiu:", max_size=24),
        st.sampled_from(
            ["10Gi", "0s", "30s", "2h", "0 */6 * * *", "@daily", "models", "../x", "a.b-c", "1.2.3"]
        ),
    )
)
def test_cel_and_python_agree_on_every_field_rule(text: str) -> None:
    for name, rule in _FIELD_RULES:
        cel = bool(_cel(rule.cel or "").evaluate({"self": celpy.json_to_cel(text)}))
        assert cel == rule.ok(text), (name, rule.message, text)


# --- cron schedules as Kubernetes' CronJob reads them ----------------------------------------------------


@pytest.mark.parametrize(
    "schedule",
    ["0 */6 * * *", "@daily", "@hourly", "@yearly", "30 2 * * MON-FRI", "0 0 1 jan,jul *", "0 0 ? * *",
     "5/15 * * * *", "0 0 29 2 *", "0 0 31 2 MON", "59 23 31 12 6"],
)  # fmt: skip
def test_schedules_kubernetes_runs_are_accepted(schedule: str) -> None:
    assert validation.check_cron(schedule) is None


@pytest.mark.parametrize(
    ("schedule", "words"),
    [
        ("60 * * * *", "the minute field allows 0-59, got 60"),
        ("0 24 * * *", "the hour field allows 0-23, got 24"),
        ("0 0 0 * *", "the day of month field allows 1-31, got 0"),
        ("0 0 1 13 *", "the month field allows 1-12 or JAN-DEC, got 13"),
        ("0 0 * * FUN", "the day of week field allows 0-6 or SUN-SAT"),
        ("1-2-3 * * * *", "has two '-'"),
        ("*/5/2 * * * *", "has two '/'"),
        ("0 0 31 4,6,9,11 *", "it never runs"),
        ("@every 5m", "@every is not supported"),
        ("* * * *", "got 4"),
    ],
)
def test_schedules_kubernetes_refuses_are_refused_in_words(schedule: str, words: str) -> None:
    problem = validation.check_cron(schedule)
    assert problem is not None and words in problem and schedule in problem
    _in_words(problem)


# --- labels and names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["gpu", "example.com/tier", "node.kubernetes.io/instance-type", "a_b.c-d"])
def test_label_keys_kubernetes_takes(key: str) -> None:
    assert validation.check_label_key(key) is None


@pytest.mark.parametrize("key", ["", "bad key!", "-a", "a-", "Example.com/x", "a/b/c", "/x", "x" * 64])
def test_label_keys_kubernetes_refuses(key: str) -> None:
    assert validation.check_label_key(key) is not None


def test_every_engine_mount_is_protected_from_the_model_mount() -> None:
    from kvcache_operator.resources import build_children

    kvc = h.make_kvcache({"persistence": {"enabled": True}, "model": {"claimName": "models"}})
    sts = next(c for c in build_children(kvc, token="t") if c["kind"] == "StatefulSet")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    own = [m["mountPath"] for m in container["volumeMounts"] if m["name"] != "model"]
    own.append(container["terminationMessagePath"])
    for mount in own:
        with pytest.raises(api.SpecError, match="cannot be the model's mount path"):
            api.parse_kvcache(h.make_kvcache({"model": {"claimName": "models", "mountPath": mount}}))


# --- whatever the models accept, Kubernetes accepts -------------------------------------------------------


def _some(valid: list[Any], invalid: list[Any]) -> st.SearchStrategy[Any]:
    """Mostly valid values (about 9 in 10), sometimes hostile ones (the models must refuse those)."""
    return st.sampled_from(valid * (9 * max(1, len(invalid)) // len(valid) + 1) + invalid)


_LABELS = st.dictionaries(
    _some(["tier", "example.com/pool", "a_b.c"], ["bad key!", "-x", "a/b/c", "Ex.com/k"]),
    _some(["", "gpu", "a-1"], ["bad value", "x" * 64]),
    max_size=2,
)
_hostile_specs = st.fixed_dictionaries(
    {},
    optional={
        "replicas": st.integers(0, 3),
        "image": _some(["engine:1", "ghcr.io/org/engine@sha256:" + "a" * 64], ["Engine:1", "a b"]),
        "cache": st.fixed_dictionaries(
            {"maxTokens": st.sampled_from([256, 1000, 65536]), "numLayers": st.integers(1, 4)},
            optional={"device": _some(["cpu", "auto"], ["gpu"]), "pinMemory": st.booleans()},
        ),
        "resources": st.fixed_dictionaries(
            {},
            optional={
                "cpu": _some(["500m", "2", "1.5", "+1"], ["-1", "0", "1K", "2000"]),
                "cpuLimit": _some(["2", "4"], ["100m"]),
                "memory": _some(["8Gi", "2G"], ["1Mi", "-8Gi", "1Ei"]),
                "memoryOverhead": _some(["0", "512Mi", "1e9"], ["1Ei", "1_0"]),
                "gpus": st.integers(0, 1),
            },
        ),
        "persistence": st.fixed_dictionaries(
            {"enabled": st.booleans()},
            optional={
                "size": _some(["1Gi", "500G", "1.5Ti"], ["0", "-5Gi", "2Pi", "5KiMi"]),
                "storageClassName": _some(["fast-ssd"], ["Fast SSD"]),
            },
        ),
        "backup": st.fixed_dictionaries(
            {},
            optional={
                "enabled": st.booleans(),
                "schedule": _some(
                    ["0 3 * * *", "@daily", "*/15 * * * MON-FRI"], ["61 * * * *", "0 0 30 2 *"]
                ),
                "size": _some(["10Gi"], ["0"]),
                "claimName": _some(["backups"], ["Backups_1"]),
            },
        ),
        "model": st.fixed_dictionaries(
            {"claimName": _some(["models"], ["My Models"])},
            optional={
                "path": _some(["llama", "m/x.gguf"], ["/etc", "../x"]),
                "mountPath": _some(["/models", "/opt/m"], ["/tmp", "models", "/var/lib/kvcache/x"]),
            },
        ),
        "scheduling": st.fixed_dictionaries(
            {},
            optional={
                "nodeSelector": _LABELS,
                "tolerations": st.lists(
                    st.fixed_dictionaries(
                        {"key": _some(["gpu", "example.com/x"], ["bad key"])},
                        optional={
                            "operator": st.sampled_from(["Exists", "Equal"]),
                            "value": _some(["a"], ["x" * 64]),
                            "effect": st.sampled_from(["NoSchedule", "NoExecute"]),
                            "tolerationSeconds": st.integers(0, 60),
                        },
                    ),
                    max_size=2,
                ),
                "priorityClassName": _some(["high"], ["High"]),
            },
        ),
        "auth": st.fixed_dictionaries(
            {}, optional={"existingSecret": _some(["tok"], ["my secret"]), "secretKey": _some(["k"], ["a/b"])}
        ),
        "metrics": st.fixed_dictionaries(
            {"serviceMonitor": st.booleans()},
            optional={
                "scrapeInterval": _some(["30s", "1s", "1h"], ["0s", "2h", "1m30s"]),
                "serviceMonitorLabels": _LABELS,
            },
        ),
        "networkPolicy": st.fixed_dictionaries(
            {"enabled": st.booleans()},
            optional={"clientPodSelector": _LABELS, "operatorNamespace": _some(["ops"], ["Ops.x"])},
        ),
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=_hostile_specs)
def test_every_spec_the_models_accept_builds_children_kubernetes_accepts(spec: dict[str, Any]) -> None:
    """1.29 and 1.35 schemas, strictly: whatever admission lets through reaches no API server error."""
    from hypothesis import event

    from kvcache_operator.resources import build_children

    obj = h.make_kvcache(spec)
    try:
        api.parse_kvcache(obj)
    except api.SpecError as exc:
        event("refused")
        for line in str(exc).splitlines():
            _in_words(line)
        return
    event("accepted")
    for manifest in build_children(obj, token="t"):
        h.kube_validate(manifest)
