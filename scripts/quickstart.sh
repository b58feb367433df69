#!/usr/bin/env bash
# Set up lookalike in ./.venv and run the main job on real photos: write the demo collection
# (photos that ship inside the scikit-image / scikit-learn wheels; nothing is downloaded),
# index it with the default cnn extractor into an embedded catalog, and search it.
# Safe to run again: setup is skipped when done, and re-indexing adds nothing.
#
# Installs the default (core) package only: no torch, no Spark. For the test tools and every
# extra: .venv/bin/pip install -c requirements.lock -e ".[dev]"
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m[%s] %s\033[0m\n' "$1" "$2" >&2; }
run() { echo "+ $*" >&2; "$@"; }

# A supported Python: 3.11 (the one CI tests in full), else 3.12 or 3.13; LOOKALIKE_PYTHON
# chooses one.
find_python() {
    local candidates=("${LOOKALIKE_PYTHON:-}" python3.11 python3.12 python3.13 python3)
    for py in "${candidates[@]}"; do
        [ -n "$py" ] || continue
        command -v "$py" >/dev/null 2>&1 || continue
        if "$py" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] <= (3, 13)))'; then
            echo "$py"
            return 0
        fi
    done
    return 1
}

if [ ! -x .venv/bin/lookalike ]; then
    if ! PY=$(find_python); then
        echo "lookalike needs Python 3.11, 3.12 or 3.13; none found on PATH" \
            "(found: $(python3 --version 2>&1 || echo 'no python3'))." >&2
        echo "Install one (e.g. apt install python3.11-venv, or pyenv install 3.12)," \
            "or set LOOKALIKE_PYTHON=/path/to/python3.12." >&2
        exit 1
    fi
    step 1/4 "Creating .venv with $("$PY" --version) ($(command -v "$PY"))"
    "$PY" -m venv .venv
    step 2/4 "Installing lookalike and its pinned dependencies (about 770 MB, 1-2 minutes)"
    echo "  numpy, ONNX Runtime (runs the cnn model), OpenCV, faiss, FastAPI, NATS, SQLite/PostgreSQL drivers..." >&2
    # pip's own lines, one per package, so the wait is visible; the summary is kept.
    .venv/bin/pip install --disable-pip-version-check -c requirements.lock -e . 2>&1 \
        | grep --line-buffered -E '^(Collecting|Building|Installing|Successfully|ERROR|error)' \
        | sed -u -e 's/^/  /' -e 's/ (from .*//' || true
    if [ ! -x .venv/bin/lookalike ]; then
        echo "the install failed; run: .venv/bin/pip install -c requirements.lock -e ." >&2
        exit 1
    fi
else
    step 1/4 "Using the existing .venv ($(.venv/bin/python --version))"
    step 2/4 "Packages already installed"
fi

step 3/4 "Writing the demo collection (real photos, 6 per listing) and indexing it"
echo "  The first index builds the cnn model's ONNX file once (cached in ~/.cache/lookalike)." >&2
run .venv/bin/lookalike demo demo
run .venv/bin/lookalike index demo/photos --catalog demo/cat
run .venv/bin/lookalike listing import demo/listings.csv --catalog demo/cat

step 4/4 "Searching: a photo of each listing taken from another viewpoint"
run .venv/bin/lookalike search demo/queries/motorcycle/q-01.jpg --catalog demo/cat -k 5 --group-by listing
run .venv/bin/lookalike search demo/queries/chelsea/q-02.jpg --catalog demo/cat -k 3 --group-by listing --where "stock_level > 0" --format json

cat >&2 <<'EOF'

Done. Try next:
  source .venv/bin/activate                 # then `lookalike ...` works without the path
  lookalike serve --catalog demo/cat        # the web page at http://127.0.0.1:8000/ (API at /docs)
  lookalike dedup --catalog demo/cat        # near-duplicates, with a calibrated threshold
  lookalike --help                          # every command; `lookalike COMMAND --help` for one
  python -c "from lookalike import open_catalog; print(open_catalog('demo/cat').count())"
EOF
