#!/usr/bin/env bash
# Non-Python linters: hadolint, shellcheck, yamllint (values files and rendered chart output)
# and helm lint --strict. Tools come from scripts/get_tools.py (helm) and the venv (the rest).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
TOOLS_JSON=$("$PY" scripts/get_tools.py --json)
tool() { "$PY" -c "import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$TOOLS_JSON" "$1"; }
HELM=$(tool helm)
HADOLINT=$(tool hadolint)
SHELLCHECK=$(tool shellcheck)
YAMLLINT=$(tool yamllint)
CHART=helm/kvcache-operator
RENDERED=.tools/rendered

echo "lint.sh: hadolint"
"$HADOLINT" --failure-threshold style Dockerfile

echo "lint.sh: shellcheck"
"$SHELLCHECK" scripts/*.sh .ci/run e2e/kind/*.sh

echo "lint.sh: helm lint --strict (defaults and each values file)"
helm_lint() {
    local out
    if ! out=$("$HELM" lint --strict "$CHART" "$@" 2>&1); then
        echo "$out"
        return 1
    fi
}
values_files=("$CHART"/ci/*-values.yaml)
helm_lint
for values in "${values_files[@]}"; do
    helm_lint -f "$values"
done

echo "lint.sh: yamllint (values, rendered chart)"
rm -rf "$RENDERED" && mkdir -p "$RENDERED"
"$HELM" template kvc "$CHART" --namespace kvcache-system >"$RENDERED/defaults.yaml"
for values in "${values_files[@]}"; do
    "$HELM" template kvc "$CHART" --namespace kvcache-system -f "$values" >"$RENDERED/$(basename "$values")"
done
"$YAMLLINT" --strict -c .yamllint.yaml "$CHART/Chart.yaml" "$CHART/values.yaml" "$CHART/ci" \
    "$CHART/files/rbac-rules.yaml" "$RENDERED" deploy .yamllint.yaml .github/workflows/e2e-kind.yaml

echo "lint.sh: ok"
