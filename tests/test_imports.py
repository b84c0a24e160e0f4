"""The package's import graph has no loop, so its modules stack in layers.

Every ``import`` and ``from ... import`` of a ``siamjax`` module counts, deferred ones
inside functions included. An import of a subpackage's module does not count as an
import of the subpackage's ``__init__`` (which may re-export its modules' names).
"""

import ast
import pathlib
import subprocess
import sys

import pytest

import siamjax

ROOT = pathlib.Path(siamjax.__file__).parent


def _modules():
  mods = {}
  for path in ROOT.rglob("*.py"):
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    mods[".".join(parts)] = path
  return mods


def _graph():
  mods = _modules()
  graph = {}
  for name, path in mods.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                          + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                   for a in node.names]
      else:
        continue
      edges.update(t for t in targets if t in mods and t != name)
    graph[name] = edges
  return graph


def _cycle(graph):
  """A loop of the graph as a list of modules, or None."""
  state, stack = {}, []

  def visit(n):
    state[n] = "open"
    stack.append(n)
    for m in sorted(graph[n]):
      if state.get(m) == "open":
        return stack[stack.index(m):] + [m]
      if m not in state and (found := visit(m)):
        return found
    stack.pop()
    state[n] = "done"
    return None

  for n in sorted(graph):
    if n not in state and (found := visit(n)):
      return found
  return None


def test_import_graph_has_no_loop():
  loop = _cycle(_graph())
  assert loop is None, "import loop: " + " -> ".join(loop)


def test_the_loop_finder_finds_a_loop():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", ["siamjax.cpu_kernels", "siamjax.encoders",
                                    "siamjax.losses", "siamjax.augment"])
def test_a_low_module_imports_alone_without_the_higher_ones(module):
  code = (f"import sys, {module}; "
          "print(' '.join(m for m in ('siamjax.models', 'siamjax.train', 'siamjax.recipes') "
          "if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True)
  # Importing any siamjax module runs siamjax/__init__, which imports models and train;
  # recipes (the highest layer) must still stay out.
  assert "siamjax.recipes" not in out.stdout
