#!/usr/bin/env bash
# Validates every manifest in deploy/kubernetes against the Kubernetes OpenAPI schemas, strictly
# (an unknown or misspelt field fails), with kubernetes-validate from deploy/requirements.txt in
# a virtualenv of its own. Checks the oldest Kubernetes the Deployment needs (1.30: the native
# preStop sleep action) and the newest the package knows. Then proves the check is strict: a
# manifest with a misspelt field must fail. Run by .ci/run; takes a few seconds after the first
# install.
set -euo pipefail
cd "$(dirname "$0")"

venv="${KUBE_VALIDATE_VENV:-${TMPDIR:-/tmp}/credential-vault-kube-validate}"
stamp="$venv/.requirements"
if ! cmp -s requirements.txt "$stamp" 2>/dev/null; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -r requirements.txt
    cp requirements.txt "$stamp"
fi
validate="$venv/bin/kubernetes-validate"

manifests=()
for file in kubernetes/*.yaml; do
    # kustomization.yaml is kustomize's configuration, not a Kubernetes object.
    [[ "$(basename "$file")" == kustomization.yaml ]] || manifests+=("$file")
done
for version in 1.30.0 1.37.0; do
    "$validate" --strict --quiet -k "$version" "${manifests[@]}"
    echo "manifests: ${#manifests[@]} files valid (strict) against Kubernetes $version"
done

# Strictness: the same Deployment with one misspelt field must be refused.
bad="$(mktemp --suffix=.yaml)"
trap 'rm -f "$bad"' EXIT
sed 's/^\(\s*\)readinessProbe:/\1readinesProbe:/' kubernetes/deployment.yaml > "$bad"
if "$validate" --strict --quiet -k 1.37.0 "$bad" >/dev/null 2>&1; then
    echo "manifests: the schema check accepted a misspelt field; it is not strict" >&2
    exit 1
fi
echo "manifests: a misspelt field is refused"
