#!/usr/bin/env bash
# Set up lookalike in ./.venv and run the main job on real photos: write the demo collection
# (photos that ship inside the scikit-image / scikit-learn wheels; nothing is downloaded),
# index it with the default cnn extractor into an embedded catalog, and search it.
# Safe to run again: setup is a no-op when done, and re-indexing adds nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/lookalike ]; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet -c requirements.lock -e ".[dev,spark]"
fi

run() { echo "+ $*" >&2; "$@"; }
run .venv/bin/lookalike demo demo
run .venv/bin/lookalike index demo/photos --catalog demo/cat
run .venv/bin/lookalike listing import demo/listings.csv --catalog demo/cat
run .venv/bin/lookalike search demo/queries/motorcycle/q-01.jpg --catalog demo/cat -k 5 --group-by listing
run .venv/bin/lookalike search demo/queries/chelsea/q-02.jpg --catalog demo/cat -k 3 --group-by listing --where "stock_level > 0" --format json
