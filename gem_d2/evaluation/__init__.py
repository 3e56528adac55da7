"""gem_d2.evaluation: per-dataset UODB evaluation (VOC07 11-point AP50 + COCO AP) and the summary table.

- :class:`UODBEvaluator` / :func:`build_uodb_evaluator`: a detectron2 ``DatasetEvaluator`` per dataset.
- :func:`summarize_results`: every dataset's row plus the unweighted average, as Markdown and JSON.
- :func:`voc07_ap_per_class`, :func:`coco_box_ap`: the metric cores, on plain numpy arrays.
"""
from gem_d2.evaluation.coco_ap import coco_box_ap
from gem_d2.evaluation.summary import COLUMNS, summarize_results
from gem_d2.evaluation.uodb_evaluator import RESULT_KEY, UODBEvaluator, build_uodb_evaluator
from gem_d2.evaluation.voc07_ap import VOC07_RECALL_THRESHOLDS, voc07_11point_ap, voc07_ap_per_class

__all__ = [
    "COLUMNS",
    "RESULT_KEY",
    "UODBEvaluator",
    "VOC07_RECALL_THRESHOLDS",
    "build_uodb_evaluator",
    "coco_box_ap",
    "summarize_results",
    "voc07_11point_ap",
    "voc07_ap_per_class",
]
