#!/usr/bin/env bash
# Install smoke test on one Python: build the sdist and the wheel (python -m build), install
# one of them with the default extras only (no torch, no Spark) into a clean venv, then index
# and search the demo collection and check the answer. Prints the install size.
#
#   bash scripts/smoke.sh python3.12 wheel     # install the wheel
#   bash scripts/smoke.sh python3.13 sdist     # install from the sdist (compiles the kernels)
#
# CI runs it on the Pythons the test suite does not run on (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?usage: smoke.sh PYTHON [wheel|sdist]}
FROM=${2:-wheel}
repo=$PWD
work=$(mktemp -d -t lookalike-smoke-XXXXXX)
trap 'rm -rf "$work"' EXIT
say() { printf '[smoke %s] %s\n' "$("$PY" -c 'import platform; print(platform.python_version())')" "$*" >&2; }

say "building sdist and wheel"
"$PY" -m venv "$work/build-env"
"$work/build-env/bin/pip" install --quiet --disable-pip-version-check -c "$repo/requirements.lock" build
"$work/build-env/bin/python" -m build --outdir "$work/dist" "$repo" >"$work/build.log" 2>&1 \
    || { tail -n 30 "$work/build.log" >&2; exit 1; }
ls -l "$work/dist" >&2

say "installing the $FROM (default extras) into a clean venv"
"$PY" -m venv "$work/venv"
case "$FROM" in
    wheel) pkg=$(ls "$work"/dist/*.whl) ;;
    sdist) pkg=$(ls "$work"/dist/*.tar.gz) ;;
    *) echo "unknown package kind $FROM (wheel or sdist)" >&2; exit 2 ;;
esac
start=$SECONDS
"$work/venv/bin/pip" install --quiet --disable-pip-version-check -c "$repo/requirements.lock" "$pkg"
say "installed in $((SECONDS - start)) s; venv size $(du -sm "$work/venv" | cut -f1) MB"
if "$work/venv/bin/python" -c 'import torch' 2>/dev/null; then
    echo "the default install pulled in torch" >&2
    exit 1
fi

say "demo: index and search (the cnn model without torch)"
cd "$work"
export LOOKALIKE_CACHE_DIR="$work/cache"
"$work/venv/bin/lookalike" demo demo >/dev/null
"$work/venv/bin/lookalike" index demo/photos --catalog demo/cat --no-progress
"$work/venv/bin/lookalike" search demo/queries/motorcycle/q-01.jpg --catalog demo/cat -k 3 \
    --group-by listing --format json >"$work/hits.json"
"$work/venv/bin/python" - "$work/hits.json" <<'EOF'
import json, sys

hits = json.load(open(sys.argv[1]))["hits"]
assert hits and hits[0]["listing_id"] == "motorcycle", hits
print(f"first hit: {hits[0]['listing_id']} {hits[0]['score']:.4f}", file=sys.stderr)
EOF
say "ok"
