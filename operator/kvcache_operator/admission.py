"""The validating admission webhook's decision: an AdmissionReview request in, a verdict out (pure).

The webhook enforces what the CRD's CEL cannot (``api.ADMISSION_CHECKS``, quantity bounds, cron
values, label syntax) by running the very validation the operator runs on reconcile
(``api.parse_kvcache``): a spec refused here is reported as ``InvalidSpec`` with the same words by an
operator whose webhook is not installed. Allowed objects get ``api.spec_warnings`` as admission
warnings (``kubectl apply`` prints them as ``Warning: ...``).

An UPDATE that leaves ``spec`` as it was (finalizers, annotations, labels) is always allowed: an object
stored before the webhook existed must stay deletable and pausable; the operator reports its spec.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from kvcache_operator import api

HANDLER_ID = "validate-kvcache"
"""Kopf's handler id; also the webhook's URL path (``/validate-kvcache``)."""
OPERATIONS: tuple[Literal["CREATE", "UPDATE"], ...] = ("CREATE", "UPDATE")


@dataclass(frozen=True)
class Verdict:
    """Allowed or not; ``message`` lists every problem (one per line), ``warnings`` one sentence each."""

    allowed: bool
    message: str = ""
    warnings: tuple[str, ...] = ()


def review(request: Mapping[str, Any]) -> Verdict:
    """The verdict on an AdmissionReview ``request`` (``operation``, ``object``, ``oldObject``)."""
    operation = request.get("operation")
    obj, old = request.get("object"), request.get("oldObject")
    if operation not in OPERATIONS or not isinstance(obj, Mapping):
        return Verdict(True)
    if operation == "UPDATE" and isinstance(old, Mapping) and old.get("spec") == obj.get("spec"):
        return Verdict(True)
    try:
        kvc = api.parse_kvcache(obj)
    except api.SpecError as exc:
        return Verdict(False, str(exc))
    return Verdict(True, warnings=tuple(api.spec_warnings(kvc.spec)))


def verdict_of(operation: str | None, body: Mapping[str, Any], old: Mapping[str, Any] | None) -> Verdict:
    """``review`` of a Kopf webhook cause (its ``operation``, ``body`` and ``old``)."""
    return review(
        {"operation": operation, "object": dict(body), "oldObject": None if old is None else dict(old)}
    )


def response(review_request: Mapping[str, Any]) -> dict[str, Any]:
    """A whole ``admission.k8s.io/v1`` AdmissionReview response for a whole AdmissionReview request, as
    the webhook answers it (Kopf builds the same shape from ``review``'s verdict)."""
    request = review_request.get("request") or {}
    verdict = review(request)
    answer: dict[str, Any] = {"uid": request.get("uid", ""), "allowed": verdict.allowed}
    if verdict.warnings:
        answer["warnings"] = list(verdict.warnings)
    if not verdict.allowed:
        answer["status"] = {"code": 422, "message": verdict.message}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": answer}


# --- offline: ``kvcache-operator validate -f FILE...`` -------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One line of ``validate``'s report: a problem (``warning`` False) or a warning, where it is."""

    source: str
    what: str  # "KVCache <name>" or "document <n>"
    text: str
    warning: bool = False

    def __str__(self) -> str:
        return f"{self.source}: {self.what}: {'warning: ' if self.warning else ''}{self.text}"


def check_documents(text: str, source: str) -> tuple[int, list[Finding]]:
    """(KVCaches found, findings) for a YAML stream; documents of other kinds are skipped (a GitOps
    directory mixes kinds), a KVCache of another apiVersion or a broken document is a problem."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        return 0, [Finding(source, "file", f"not valid YAML: {exc}".replace("\n", " "))]
    found, findings = 0, []
    for i, doc in enumerate(docs):
        if not isinstance(doc, Mapping) or doc.get("kind") != api.KIND:
            continue
        found += 1
        name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), Mapping) else None
        what = f"{api.KIND} {name}" if isinstance(name, str) else f"document {i}"
        if doc.get("apiVersion") != api.API_VERSION:
            findings.append(
                Finding(
                    source,
                    what,
                    f"apiVersion: {doc.get('apiVersion')!r} is not served; use {api.API_VERSION}",
                )
            )
            continue
        verdict = review({"operation": "CREATE", "object": doc})
        findings += [Finding(source, what, line) for line in verdict.message.splitlines()]
        findings += [Finding(source, what, w, warning=True) for w in verdict.warnings]
    return found, findings


def validate_files(filenames: list[str]) -> tuple[str, bool]:
    """The report of ``validate`` over files (``-`` is stdin) and whether every KVCache is valid."""
    findings: list[Finding] = []
    caches = 0
    for filename in filenames:
        try:
            text = sys.stdin.read() if filename == "-" else Path(filename).read_text()
        except OSError as exc:
            findings.append(Finding(filename, "file", f"cannot read: {exc.strerror}"))
            continue
        found, more = check_documents(text, filename)
        if found == 0 and not more:
            more = [Finding(filename, "file", f"no {api.KIND} in it", warning=True)]
        caches += found
        findings += more
    problems = [f for f in findings if not f.warning]
    invalid = len({(f.source, f.what) for f in problems})
    summary = (
        f"{caches} {api.KIND}(s) checked: {invalid} invalid ({len(problems)} problem(s)), "
        f"{len(findings) - len(problems)} warning(s)"
    )
    return "".join(f"{f}\n" for f in findings) + summary + "\n", not problems
