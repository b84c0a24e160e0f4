"""Where siamjax keeps what it can rebuild: decoded datasets, the built CPU kernel and
compiled programs."""

from __future__ import annotations

import os


def cache_dir() -> str:
  """``$SIAMJAX_CACHE_DIR``, else ``~/.cache/siamjax``."""
  return os.environ.get("SIAMJAX_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "siamjax")
