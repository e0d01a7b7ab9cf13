"""docs/troubleshooting.md and docs/operations.md are executable: every block is checked.

* sh blocks run against real engines, grouped by their ``reproduce`` scenario (one engine per
  scenario and doc, blocks in document order); the slow scenarios run under ``make e2e``;
* sh cluster blocks run against the local cluster (tests/docs/test_docs_cluster.py, slow);
* yaml blocks validate as KVCache manifests or spec fragments; promql blocks name only
  exported metrics; every reproduce names a known scenario and every symptom of the seed has
  its section.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.docs.harness import DOCS, Block, check, parse, report, run_sh, scratch_checkout
from tests.docs.scenarios import SCENARIOS, EngineProcess, request
from tests.service.s3_server import s3_endpoint

__all__ = ["s3_endpoint"]

SEED_SYMPTOMS = (
    "High latency",
    "Low throughput",
    "Memory growth",
    "Memory fragmentation",
    "CUDA out of memory",
    "GPU not detected",
    "Low hit rate",
    "Cache corruption",
    "Persistence fails",
    "Cache not restored after restart",
    "Inconsistent results",
)
OPERATIONS_TOPICS = (
    "Install",
    "Upgrade",
    "Backup and restore",
    "Scaling and tuning",
    "Pausing",
    "Hibernation",
    "Capacity planning",
)
OPERATOR_METRICS = ("kvcache_operator_",)


def _blocks() -> list[Block]:
    return [b for doc in DOCS for b in parse(doc)]


def _engine_groups() -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    for b in _blocks():
        key = (b.doc, b.reproduce or "default")
        if b.lang == "sh" and not b.cluster and key not in seen:
            seen.append(key)
    return seen


def _params() -> Iterator[Any]:
    for doc, name in _engine_groups():
        scenario = SCENARIOS.get(name)
        marks = [pytest.mark.slow] if scenario is not None and scenario.slow else []
        yield pytest.param(doc, name, marks=marks, id=f"{doc}-{name}")


# --- static checks (fast) ------------------------------------------------------------------------


def test_docs_parse_and_name_known_scenarios() -> None:
    blocks = _blocks()
    assert {b.doc for b in blocks} == {d.name for d in DOCS}
    unknown = {b.reproduce for b in blocks if b.reproduce and b.reproduce not in SCENARIOS}
    assert not unknown, f"reproduce names without a scenario in tests/docs/scenarios.py: {unknown}"
    silent = [b.where for b in blocks if b.lang == "sh" and not b.expects and not b.expects_not]
    assert not silent, f"sh blocks with no expect (say what the command shows): {silent}"


def test_every_seed_symptom_and_operations_topic_has_a_section() -> None:
    headings = {
        doc.name: [line.lstrip("#").strip() for line in doc.read_text().splitlines() if line.startswith("#")]
        for doc in DOCS
    }
    for symptom in SEED_SYMPTOMS:
        assert any(h.startswith(symptom) for h in headings["troubleshooting.md"]), symptom
    for topic in OPERATIONS_TOPICS:
        assert any(h.startswith(topic) for h in headings["operations.md"]), topic


def test_every_symptom_section_has_a_diagnosis_and_a_fix_that_run() -> None:
    """Each symptom section runs at least one engine or cluster command and shows a spec change."""
    blocks = [b for b in parse(DOCS[0]) if b.lang in ("sh", "yaml")]
    text = DOCS[0].read_text()
    for symptom in SEED_SYMPTOMS:
        start = text.index(next(h for h in text.splitlines() if h.startswith("## ") and symptom in h))
        end = text.find("\n## ", start + 1)
        body = text[start : end if end > 0 else len(text)]
        assert "```sh" in body, f"{symptom}: no diagnosis command"
        assert "```yaml" in body or "kubectl patch" in body or "kvcache-engine" in body, f"{symptom}: no fix"
    assert blocks


def _spec_of(doc: dict[str, Any]) -> dict[str, Any]:
    if doc.get("kind") == "KVCache":
        return doc
    assert set(doc) == {"spec"}, f"a yaml block is a KVCache or a 'spec:' fragment, got keys {sorted(doc)}"
    return {"apiVersion": "kvcache.dev/v1alpha1", "kind": "KVCache", "metadata": {"name": "demo"}, **doc}


def _merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in patch.items()}}
    return patch


def test_yaml_blocks_are_valid_kvcache_specs() -> None:
    """Spec fragments are merged into a small valid cache (persistence on, loops off) and parsed by
    the CRD model, so a renamed or removed field, or a fragment the CEL rules reject, fails here."""
    from kvcache_operator import api

    base = {"apiVersion": "kvcache.dev/v1alpha1", "kind": "KVCache", "metadata": {"name": "demo"},
            "spec": {"persistence": {"enabled": True}}}  # fmt: skip
    checked = 0
    for block in (b for b in _blocks() if b.lang == "yaml"):
        for doc in (d for d in yaml.safe_load_all(block.code) if d):
            obj = _spec_of(doc)
            merged = obj if doc.get("kind") == "KVCache" else _merge(base, obj)
            try:
                api.parse_kvcache(merged)
            except Exception as exc:  # the message names the field
                pytest.fail(f"{block.where}: not a valid KVCache: {exc}")
            checked += 1
    assert checked


def test_promql_blocks_name_exported_metrics(tmp_path: Path) -> None:
    engine = EngineProcess(tmp_path / "engine", {}).start()
    try:
        status, text = request("GET", engine.url + "/metrics")
        assert status == 200
    finally:
        engine.stop()
    exported = set(re.findall(r"^# TYPE (\S+) (\S+)", text, re.MULTILINE))
    names = set()
    for name, kind in exported:
        names.add(name)
        if kind == "counter":
            names.add(name + "_total")
        if kind == "histogram":
            names.update({name + "_bucket", name + "_sum", name + "_count"})
    operator_source = (DOCS[0].parents[1] / "operator" / "kvcache_operator" / "metrics.py").read_text()
    for block in (b for b in _blocks() if b.lang == "promql"):
        used = set(re.findall(r"\b(kvcache_[a-z0-9_]+)", block.code))
        missing = {m for m in used - names if not (m.startswith(OPERATOR_METRICS) and m in operator_source)}
        assert not missing, f"{block.where}: metrics neither the engine nor the operator exports: {missing}"


# --- the commands, against real engines ------------------------------------------------------------


@pytest.fixture
def s3_bucket_env(s3_endpoint: str) -> dict[str, str]:
    """``$S3_ENDPOINT``/``$S3_BUCKET`` and the keys for the object-store drills: a real S3-protocol
    server (moto's) on loopback with an empty bucket."""
    from kvcache_engine.objectstore import ObjectStore, S3Client
    from tests.service.s3_server import ACCESS_KEY, SECRET_KEY

    bucket = f"docs-{len(_S3_BUCKETS)}"
    _S3_BUCKETS.append(bucket)
    with S3Client(ObjectStore(s3_endpoint, bucket, access_key=ACCESS_KEY, secret_key=SECRET_KEY)) as c:
        c.create_bucket()
    return {
        "S3_ENDPOINT": s3_endpoint,
        "S3_BUCKET": bucket,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    }


_S3_BUCKETS: list[str] = []


@pytest.mark.parametrize(("doc", "scenario"), list(_params()))
def test_engine_blocks(doc: str, scenario: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    blocks = [
        b
        for b in _blocks()
        if b.doc == doc and b.lang == "sh" and not b.cluster and (b.reproduce or "default") == scenario
    ]
    engine = SCENARIOS[scenario].build(tmp_path / "engine")
    work = scratch_checkout(tmp_path / "work")
    failures = []
    env = engine.env()
    if any("$S3_ENDPOINT" in b.code for b in blocks):
        env.update(request.getfixturevalue("s3_bucket_env"))
    try:
        for block in blocks:
            result = run_sh(block, work, env)
            problems = check(block, result)
            if problems:
                failures.append(report(block, result, problems))
    finally:
        engine.close()
    assert not failures, "\n\n".join(failures) + f"\n--- engine log ---\n{engine.log()[-3000:]}"
