#!/usr/bin/env bash
# The Python clients the tests drive the HTTP front with (the official `openai`
# package, `prometheus_client`'s text parser, transformers for the reference
# rendering of chat templates, and lm-evaluation-harness with its API
# models), in a venv in a cache folder
# outside the repository. Prints the venv's python.
#
#   PY=$(scripts/py-venv.sh)
set -euo pipefail
venv="${XDG_CACHE_HOME:-$HOME/.cache}/zeroshard/py-venv"
want="openai==3.57.0 prometheus_client==0.26.0 transformers==5.24.0 jinja2==3.1.6 lm_eval[api]==0.4.13"
stamp="$venv/.zeroshard-packages"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== installing $want into $venv" >&2
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  if ! python3 -m venv "$venv" >&2; then
    echo "py-venv.sh: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2
    exit 1
  fi
  # shellcheck disable=SC2086
  "$venv/bin/pip" install --quiet --disable-pip-version-check $want >&2
  echo "$want" >"$stamp"
fi
echo "$venv/bin/python"
