"""Datasets loaded into arrays (one module per dataset)."""

from siamjax.data.omniglot import (
    LakeRuns,
    OmniglotDataError,
    OmniglotSplit,
    load_lake_runs,
    load_omniglot,
)

__all__ = ["LakeRuns", "OmniglotDataError", "OmniglotSplit", "load_lake_runs", "load_omniglot"]
