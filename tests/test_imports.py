"""The package's import graph has no loop, and its modules stack in layers (:data:`LAYERS`).

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


# Each module's layer, by the longest matching name (a package's name covers its modules).
# A module imports only modules of its own layer or lower ones; a new module needs a row.
LAYERS = {
    # 0: foundations: checks, machine facts, XLA flags, devices, data files, the registry
    "siamjax._cache": 0, "siamjax._checks": 0, "siamjax._pooling": 0, "siamjax._progress": 0,
    "siamjax.machine": 0, "siamjax.xla": 0,
    "siamjax.parallel": 0, "siamjax.augment": 0, "siamjax.data": 0, "siamjax.recipes": 0,
    # 1: pure functions: distances, kernels, losses, samplers, search, evaluation, plots
    "siamjax.distances": 1, "siamjax.cpu_kernels": 1, "siamjax.fourier": 1,
    "siamjax.losses": 1, "siamjax.memory": 1, "siamjax.sampling": 1, "siamjax.index": 1,
    "siamjax.evaluation": 1, "siamjax.fewshot": 1, "siamjax.bag": 1, "siamjax.results": 1,
    "siamjax.plotting": 1,
    # 2: networks and the training loop
    "siamjax.encoders": 2, "siamjax.models": 2, "siamjax.train": 2,
    # 3: using a trained model, and what every recipe shares
    "siamjax.inference": 3, "siamjax.export": 3, "siamjax.recipes.cli": 3,
    "siamjax.recipes.learning_curves": 3,
    # 4: the recipes, the command line and the package's own namespace
    "siamjax.recipes.": 4, "siamjax.__main__": 4, "siamjax": 4,
}


def _layer(module):
  keys = [k for k in LAYERS
          if module == k or module.startswith(k if k.endswith(".") else k + ".")]
  assert keys, f"{module} has no layer in tests/test_imports.py LAYERS: give it one"
  return LAYERS[max(keys, key=len)]


def _upward(graph):
  return [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
          for a, targets in sorted(graph.items()) for b in sorted(targets)
          if _layer(b) > _layer(a)]


def test_no_module_imports_from_a_higher_layer():
  upward = _upward(_graph())
  assert not upward, "\n".join(upward)


def test_the_layer_check_sees_an_upward_import():
  assert _layer("siamjax.losses._mining") == 1 and _layer("siamjax.recipes") == 0
  assert _layer("siamjax.recipes.mnist") == 4 and _layer("siamjax.recipes.cli") == 3
  assert _upward({"siamjax.losses._mining": {"siamjax.train", "siamjax._checks"}}) == [
      "siamjax.losses._mining (layer 1) imports siamjax.train (layer 2)"]


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
