"""Task types, found by name (base.py's registry): importing the package registers every type's file."""

from mbtrain.tasks import binary, multiclass, regression  # noqa: F401  (each registers its type)
from mbtrain.tasks.base import (
    TASK_TYPES,
    LabelSums,
    TaskSet,
    TaskSettings,
    TaskType,
    check_funnel_types,
    headline,
    higher_is_better,
    infer_type,
    monitors,
    register,
    type_of_metrics,
)

__all__ = ["TASK_TYPES", "LabelSums", "TaskSet", "TaskSettings", "TaskType", "check_funnel_types", "headline",
           "higher_is_better", "infer_type", "monitors", "register", "type_of_metrics"]
