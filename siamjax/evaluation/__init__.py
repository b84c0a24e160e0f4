"""Evaluation: N-way one-shot tasks (Lake's runs, random tasks) scored on the device."""

from siamjax.evaluation.oneshot import (
    LAKE_PROTOCOL,
    OneShotResult,
    accuracy_interval,
    evaluate_oneshot,
    neg_squared_euclidean,
    oneshot_predictions,
    pixel_embed,
    sample_oneshot_tasks,
)

__all__ = ["LAKE_PROTOCOL", "OneShotResult", "accuracy_interval", "evaluate_oneshot",
           "neg_squared_euclidean", "oneshot_predictions", "pixel_embed", "sample_oneshot_tasks"]
