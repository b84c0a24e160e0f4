"""Sphinx configuration: the user's guides in docs/*.md and the API reference, generated
from the docstrings by autodoc. ``scripts/build_docs.sh`` builds it in strict mode: a
warning, a broken cross-reference or a public name without a docstring fails."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "siamjax"
author = "siamjax developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"
html_theme = "alabaster"
myst_heading_anchors = 3

autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the docstrings give types and shapes
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True
autodoc_inherit_docstrings = False  # Flax's own method docstrings are not ours

nitpicky = True  # every cross-reference must resolve
# Names outside siamjax (JAX, NumPy, Flax, optax, orbax, the standard library): no
# inventory is fetched at build time, so references to them are not checked.
nitpick_ignore_regex = [
    (r"py:.*", r"(.*\.)?_[A-Za-z].*"),  # private names (not part of the reference)
    (r"py:.*", r"(jax|jnp|np|numpy|flax|nn|optax|orbax|ocp|chex|typing|collections|os|"
               r"pathlib|Path|faiss|PIL|matplotlib|dataclasses|concurrent|threading|"
               r"tensorflow_datasets|torch)(\..*)?"),
    (r"py:class", r"(jax\.Array|Array|ArrayLike|PyTree|Callable|Sequence|Any|Iterable|"
                  r"Iterator|Mapping|NamedTuple|Enum|Exception|ValueError|RuntimeError|"
                  r"int|float|str|bool|dict|list|tuple|None|object)"),
]


_PROTOCOL = {"tree_flatten", "tree_unflatten", "setup", "__call__"}


def _require_docstrings(app, what, name, obj, options, lines):
  """A public name documented without a docstring fails the strict build."""
  short = name.rsplit(".", 1)[-1]
  if short in _PROTOCOL or not getattr(obj, "__module__", "siamjax").startswith("siamjax"):
    return  # protocol methods (pytrees, Flax) and values from other packages
  if what in ("module", "class", "function", "method", "exception") and not short.startswith(
      "_") and not any(line.strip() for line in lines):
    from sphinx.util import logging

    logging.getLogger("siamjax.docs").warning(f"{name} has no docstring", type="siamjax",
                                              subtype="docstring")


def setup(app):
  app.connect("autodoc-process-docstring", _require_docstrings)
