#!/usr/bin/env bash
# Builds the user's guides and the API reference (generated from the docstrings) into
# docs/_build/html, strictly: any warning fails the build, a broken cross-reference and a
# public name without a docstring included. Needs the docs extra: pip install -e '.[docs]'
set -euo pipefail
cd "$(dirname "$0")"
rm -rf _build
python -m sphinx -b html -W --keep-going -n -q . _build/html
echo "docs: $(pwd)/_build/html/index.html"
