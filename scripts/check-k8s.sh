#!/usr/bin/env bash
# Checks the Kubernetes manifests of deploy/k8s offline (no cluster needed):
# renders every overlay with Kustomize, validates each object against the
# Kubernetes schemas (kubernetes-validate --strict, for the oldest supported
# and the newest known Kubernetes; the Prometheus Operator's monitors, which
# it has no schema for, are checked by check-rendered.py alone), checks that
# the objects fit together and fit zeroshard (deploy/k8s/check-rendered.py),
# checks the Grafana dashboard's queries against the metrics the Rust sources
# record (deploy/grafana/check-dashboard.py), and lints the YAML.
#
#   scripts/check-k8s.sh        # from any directory
#
# Installs what is missing: kubectl 1.20 (Debian's kubernetes-client, whose
# Kustomize v2.0.3 is the oldest the manifests are written for: apt-get install
# when there is no kubectl, else the package is unpacked into the cache so as
# not to replace the kubectl there, which renders every overlay a second time),
# and kubernetes-validate + yamllint + promql-parser into a virtualenv in the cache
# (${XDG_CACHE_HOME:-~/.cache}/zeroshard/k8s-venv), reused by later runs.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
k8s="$repo/deploy/k8s"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/zeroshard"
venv="$cache/k8s-venv"
# Pinned, so that a run checks what the last one did; raise them together.
python_packages=(kubernetes-validate==1.37.0 yamllint==1.38.0 promql-parser==0.11.0)
# The oldest Kubernetes the manifests are for: gRPC probes are GA in 1.27.
min_kubernetes=1.27.0

die() {
  echo "check-k8s: $*" >&2
  exit 1
}
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi
}
apt_get() {
  as_root env DEBIAN_FRONTEND=noninteractive apt-get "$@" >/dev/null 2>&1
}
# apt-get install, updating the package lists first only when needed.
apt_install() {
  apt_get install -y "$@" || { apt_get update && apt_get install -y "$@"; }
}
# The .deb of a package, into the current directory (needs no root).
apt_download() {
  apt-get download "$1" >/dev/null 2>&1 || { apt_get update && apt-get download "$1" >/dev/null 2>&1; }
}
kubectl_version() {
  "$1" version --client -o json 2>/dev/null | grep -o '"gitVersion": *"[^"]*"' | head -n1 | grep -o 'v[0-9][^"]*'
}

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# ---------------------------------------------------------------- kubectl
# kubectl 1.20 always renders; a different kubectl on PATH renders too.
old_kubectl=""
path_kubectl="$(command -v kubectl || true)"
if [ -n "$path_kubectl" ] && [[ "$(kubectl_version "$path_kubectl")" == v1.20.* ]]; then
  old_kubectl="$path_kubectl"
elif [ -z "$path_kubectl" ]; then
  echo "== installing kubernetes-client (kubectl 1.20)"
  if ! apt_install kubernetes-client; then
    die "kubectl not found and installing kubernetes-client failed (needs root or passwordless sudo, and apt)"
  fi
  old_kubectl="$(command -v kubectl)" || die "kubernetes-client installed no kubectl on PATH"
else
  old_kubectl="$cache/kubectl-1.20/usr/bin/kubectl"
  if [ ! -x "$old_kubectl" ]; then
    echo "== unpacking kubernetes-client (kubectl 1.20) into $cache/kubectl-1.20 (another kubectl is installed)"
    mkdir -p "$tmp/deb"
    if ! (cd "$tmp/deb" && apt_download kubernetes-client); then
      die "could not download Debian's kubernetes-client (kubectl 1.20) with apt-get download"
    fi
    rm -rf "$cache/kubectl-1.20"
    mkdir -p "$cache"
    dpkg-deb -x "$tmp"/deb/kubernetes-client_*.deb "$cache/kubectl-1.20"
  fi
fi
old_version="$(kubectl_version "$old_kubectl")" || die "$old_kubectl does not run"
[[ "$old_version" == v1.20.* ]] || die "$old_kubectl is $old_version, expected v1.20.x"
renderers=("$old_kubectl")
versions=("$old_version")
if [ -n "$path_kubectl" ] && [ "$path_kubectl" != "$old_kubectl" ]; then
  renderers+=("$path_kubectl")
  versions+=("$(kubectl_version "$path_kubectl" || echo "unknown version")")
fi

# ---------------------------------------------------------------- venv
stamp="$venv/.zeroshard-packages"
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/yamllint" ] \
    || [ "$(cat "$stamp" 2>/dev/null)" != "${python_packages[*]}" ]; then
  echo "== installing ${python_packages[*]} into $venv"
  command -v python3 >/dev/null || die "python3 not found (Debian: apt-get install python3 python3-venv)"
  rm -rf "$venv"
  mkdir -p "$cache"
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    rm -rf "$venv"
    apt_install python3-venv || die "python3 -m venv failed and installing python3-venv failed"
    python3 -m venv "$venv" || die "python3 -m venv $venv failed"
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check "${python_packages[@]}" \
    || die "pip install ${python_packages[*]} failed"
  echo "${python_packages[*]}" >"$stamp"
fi
py="$venv/bin/python"
latest_kubernetes="$("$py" -c 'import kubernetes_validate.utils as u; print(u.latest_version())')"
mm() { echo "${1%.*}"; }

# validate FILE: every object valid for both versions, strictly; any warning
# (a kind without a schema passes with only a warning) is a failure. The
# Prometheus Operator's objects (monitoring.coreos.com) have no schema there:
# they are left out here, and check-rendered.py checks them.
validate() {
  local out objects core="$1.core"
  "$py" "$k8s/check-rendered.py" --core "$1" >"$core" || return 1
  objects="$(grep -c '^kind:' "$core" || true)"
  if [ "$objects" = 0 ]; then
    echo "no objects rendered" >&2
    return 1
  fi
  if ! out="$("$venv/bin/kubernetes-validate" --strict -k "$min_kubernetes" -k "$latest_kubernetes" "$core" 2>&1)"; then
    echo "$out" | grep -v '^INFO' >&2
    return 1
  fi
  if echo "$out" | grep -qv '^INFO'; then
    echo "$out" | grep -v '^INFO' >&2
    return 1
  fi
  if [ "$(echo "$out" | grep -c '^INFO')" != "$((objects * 2))" ]; then
    echo "$out" >&2
    echo "expected $((objects * 2)) passes ($objects objects, 2 versions)" >&2
    return 1
  fi
}

# ---------------------------------------------------------------- self-checks
# The validator must reject what is wrong, or this script would pass anything.
cat >"$tmp/broken.yaml" <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata:
  name: broken-replicas
spec:
  replicas: "three"
  selector:
    matchLabels: {app: x}
  template:
    metadata:
      labels: {app: x}
    spec:
      containers: [{name: c, image: x}]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: broken-field
spec:
  replica: 3
  selector:
    matchLabels: {app: x}
  template:
    metadata:
      labels: {app: x}
    spec:
      containers: [{name: c, image: x}]
EOF
rejected="$("$venv/bin/kubernetes-validate" --strict -k "$latest_kubernetes" "$tmp/broken.yaml" 2>&1 || true)"
if ! { echo "$rejected" | grep -q '^ERROR.*broken-replicas.*replicas'; } \
    || ! { echo "$rejected" | grep -q '^ERROR.*broken-field.*replica'; }; then
  echo "$rejected" >&2
  die "self-check: kubernetes-validate accepted a Deployment with replicas: \"three\" or an unknown field"
fi

# ---------------------------------------------------------------- overlays
echo "== deploy/k8s: kustomize via kubectl ${versions[*]}; kubernetes-validate --strict" \
  "$(mm "$min_kubernetes") and $(mm "$latest_kubernetes")"
failed=0
# The overlays whose rendering check-rendered.py --self-test breaks: the cpu
# one, and the one with monitors. Each gets its status once it ran.
declare -A self_test=([cpu]=0 [prometheus-operator]=0)
overlays=()
for dir in "$k8s"/overlays/*/; do
  [ -f "$dir/kustomization.yaml" ] && overlays+=("$(basename "$dir")")
done
[ "${#overlays[@]}" -gt 0 ] || die "no overlays under $k8s/overlays"
for overlay in "${overlays[@]}" examples; do
  dir="$k8s/overlays/$overlay"
  [ "$overlay" = examples ] && dir="$k8s/examples"
  files=()
  ok=1
  for i in "${!renderers[@]}"; do
    out="$tmp/$overlay.$i.yaml"
    if ! "${renderers[$i]}" kustomize "$dir" >"$out" 2>"$tmp/err"; then
      echo "overlay $overlay: kubectl ${versions[$i]} kustomize failed:" >&2
      cat "$tmp/err" >&2
      ok=0
      continue
    fi
    files+=("$out")
    if ! validate "$out"; then
      echo "overlay $overlay: not valid as rendered by kubectl ${versions[$i]} (above)" >&2
      ok=0
    fi
  done
  if [ "$ok" = 1 ]; then
    if [ "$overlay" = examples ]; then
      objects="$(grep -c '^kind:' "${files[0]}" || true)"
      [ "$objects" -gt 0 ] || { echo "examples: render no objects" >&2; ok=0; }
      if [ "${#files[@]}" -gt 1 ] && ! "$py" "$k8s/check-rendered.py" --same "${files[@]}"; then
        ok=0
      fi
    elif ! objects="$("$py" "$k8s/check-rendered.py" "$overlay" "${files[@]}")"; then
      echo "overlay $overlay: the checks above failed" >&2
      ok=0
    fi
  fi
  label="overlay $overlay"
  [ "$overlay" = examples ] && label="examples"
  [ -n "${self_test[$overlay]+set}" ] && self_test[$overlay]="$ok"
  if [ "$ok" = 1 ]; then
    same=""
    [ "${#files[@]}" -gt 1 ] && same=", the same objects from both kubectls"
    monitors="$(grep -c '^apiVersion: monitoring.coreos.com/' "${files[0]}" || true)"
    [ "$monitors" -gt 0 ] && same="$same; $monitors of them Prometheus Operator monitors, checked by check-rendered.py alone"
    echo "$label: $objects objects, valid for Kubernetes $(mm "$min_kubernetes") and $(mm "$latest_kubernetes")$same"
  else
    failed=1
  fi
done

# The zeroshard checks must catch what they are for (on the renderings that
# passed them).
for overlay in "${!self_test[@]}"; do
  if [ "${self_test[$overlay]}" = 1 ] \
      && ! "$py" "$k8s/check-rendered.py" --self-test "$overlay" "$tmp/$overlay.0.yaml"; then
    echo "self-check: check-rendered.py missed a deliberate breakage of overlay $overlay (above)" >&2
    failed=1
  fi
done

# ---------------------------------------------------------------- grafana
# Every query of the dashboard parses and selects only zeroshard_* series the
# Rust sources record; the check must catch deliberate breakages of it.
dashboard="$repo/deploy/grafana/zeroshard.json"
if counts="$("$py" "$repo/deploy/grafana/check-dashboard.py" "$dashboard" "$repo")"; then
  if "$py" "$repo/deploy/grafana/check-dashboard.py" --self-test "$dashboard" "$repo"; then
    echo "deploy/grafana/zeroshard.json: $counts, every series a zeroshard metric the sources record"
  else
    echo "self-check: check-dashboard.py missed a deliberate breakage (above)" >&2
    failed=1
  fi
else
  echo "deploy/grafana/zeroshard.json: the problems above" >&2
  failed=1
fi

# ---------------------------------------------------------------- yamllint
if ! "$venv/bin/yamllint" --strict -c "$k8s/.yamllint" "$k8s"; then
  echo "yamllint: deploy/k8s has the problems above" >&2
  failed=1
fi

[ "$failed" = 0 ] || die "FAILED"
echo "check-k8s: all overlays valid; dashboard checked; yamllint clean"
