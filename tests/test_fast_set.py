"""The fast set's table (``conftest.FAST_CASES``) names tests that exist."""

import pathlib
import re

import conftest

ROOT = pathlib.Path(conftest.__file__).parent


def test_every_fast_cases_entry_names_a_test_that_exists():
  missing = []
  for node in conftest.FAST_CASES:
    path, _, name = node.partition("::")
    if not (ROOT / path).is_file():
      missing.append(node)
      continue
    if name == path.removesuffix(".py").replace("/", "."):  # a module docstring's doctests
      continue
    source = (ROOT / path).read_text()
    short = name.rpartition(".")[2]  # a doctest's node names its object
    if not re.search(rf"^\s*(def|class) {re.escape(short)}\b", source, re.MULTILINE):
      missing.append(node)
  assert not missing, f"conftest.py FAST_CASES names tests that do not exist: {missing}"
