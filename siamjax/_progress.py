"""The progress bar of the inference commands (private): on standard error, and only when
it is a terminal, so a log file or CI gets no frames."""

import sys


def bar(total: int, desc: str, unit: str):
  """A ``tqdm`` bar of ``total`` units, shown only when standard error is a terminal."""
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
              disable=not sys.stderr.isatty())
