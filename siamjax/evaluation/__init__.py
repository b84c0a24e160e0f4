"""Evaluation on the device: N-way one-shot tasks and pair verification.

* :mod:`siamjax.evaluation.oneshot`: Lake's 20-way runs and random N-way tasks, scored
  in one jitted call, with a 95% interval.
* :mod:`siamjax.evaluation.verification`: ROC, AUC, EER, the threshold for a target
  false-accept rate, best-threshold accuracy and the worst-judged pairs.
* :mod:`siamjax.evaluation.retrieval`: precision@1, recall@k, R-precision, MAP@R and MRR
  of ranking a reference set (or the queries themselves), and recall@1 over a whole set,
  chunked on the device.

Their plots live in :mod:`siamjax.plotting`.
"""

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

from siamjax.evaluation.retrieval import recall_at_1, retrieval_metrics

from siamjax.evaluation.verification import (
    accuracy_at,
    auc,
    best_threshold_accuracy,
    equal_error_rate,
    hardest_mistakes,
    roc_curve,
    threshold_at_far,
    verification_report,
)

__all__ = ["accuracy_at", "auc", "best_threshold_accuracy", "equal_error_rate",
           "hardest_mistakes", "recall_at_1", "roc_curve", "threshold_at_far",
           "verification_report",
           "LAKE_PROTOCOL", "OneShotResult", "accuracy_interval", "evaluate_oneshot",
           "neg_squared_euclidean", "oneshot_predictions", "pixel_embed", "sample_oneshot_tasks"]
__all__ += ["retrieval_metrics"]
