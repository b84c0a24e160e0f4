"""``python -m siamjax.cpu_kernels build | route`` (:func:`siamjax.cpu_kernels._library._main`)."""

import sys

from siamjax.cpu_kernels._library import _main

sys.exit(_main())
