"""Datasets loaded into arrays (one module per dataset).

* :mod:`siamjax.data.omniglot`: Lake's Omniglot zips, the 20 one-shot runs, tfds source.
* :mod:`siamjax.data.mnist`: MNIST IDX files or tfds.
* :mod:`siamjax.data.folders`: folders of class-named image subfolders; vector-pair CSVs.
* :mod:`siamjax.data.thucnews`: THUCNews titles for few-shot text classification.
"""

from siamjax.data.omniglot import (
    LakeRuns,
    OmniglotDataError,
    OmniglotSplit,
    load_lake_runs,
    load_omniglot,
)

__all__ = ["LakeRuns", "OmniglotDataError", "OmniglotSplit", "load_lake_runs", "load_omniglot"]
