"""``python -m siamjax.cpu_kernels build | route``: see :func:`siamjax.cpu_kernels._main`."""

import sys

from siamjax.cpu_kernels import _main

sys.exit(_main())
