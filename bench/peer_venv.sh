#!/usr/bin/env bash
# bash bench/peer_venv.sh NAME CHECK PACKAGE...: create or refresh bench/NAME, a peer library's own environment.
# torch is pinned to the same 2.13.0 as tether's .venv (installed first, then held by a constraints file so no
# dependency can swap it); then PACKAGE... is installed, and the Python statement CHECK must run in it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
name="$1" check="$2"
shift 2
venv="$here/$name"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip="$venv/bin/pip"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" > "$constraints"
echo "[$name] torch 2.13.0 first"
"$pip" install -q "torch==2.13.0"
echo "[$name] $* and their dependencies"
"$pip" install -q -c "$constraints" "$@"
"$venv/bin/python" -c "import torch, transformers, trl; $check
print(f'[$name] ok: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}')"
