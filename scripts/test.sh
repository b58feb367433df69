#!/usr/bin/env bash
# Run the test suite: make sure .venv has the test tools and every extra (pip install
# -e ".[dev]" with the lock; skipped when pyproject.toml and requirements.lock are unchanged
# since the last install), say which system services are missing, then run pytest.
# Arguments go to pytest:  bash scripts/test.sh tests/test_engine.py -x
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    py=""
    for candidate in "${LOOKALIKE_PYTHON:-}" python3.11 python3.12 python3.13 python3; do
        [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] <= (3, 13)))'; then
            py=$candidate; break
        fi
    done
    [ -n "$py" ] || { echo "the tests need Python 3.11, 3.12 or 3.13" >&2; exit 1; }
    echo "[test] creating .venv with $("$py" --version)" >&2
    "$py" -m venv .venv
fi

stamp=.venv/.lookalike-dev
want=$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[test] installing lookalike[dev] (test tools, torch as the model's reference, Spark...)" >&2
    .venv/bin/pip install --quiet --disable-pip-version-check -c requirements.lock -e ".[dev]"
    echo "$want" >"$stamp"
fi

# The suite runs real services; without them those tests are skipped (and say so).
missing=()
command -v nats-server >/dev/null || missing+=("nats-server (stream tests)")
command -v chromium >/dev/null || missing+=("chromium (web page tests)")
{ command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; } \
    || missing+=("postgresql (PostgreSQL store tests)")
command -v java >/dev/null || missing+=("openjdk-17-jre-headless (Spark tests)")
[ -d /usr/share/datasets/fashion-mnist ] || missing+=("dataset-fashion-mnist (descriptor tests)")
[ -d /usr/share/tuxpaint/stamps ] || missing+=("tuxpaint-stamps-default (descriptor tests)")
if [ ${#missing[@]} -gt 0 ]; then
    echo "[test] not installed, their tests will be skipped: ${missing[*]}" >&2
    echo "[test] Debian/Ubuntu: apt-get install nats-server chromium postgresql openjdk-17-jre-headless" >&2
fi

exec .venv/bin/python -m pytest "$@"
