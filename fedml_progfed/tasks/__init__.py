"""Tasks: what is learned and how it is scored (loss for clients, scores for the server).

Each data set names its task in the data registry
(:class:`fedml_progfed.data.registry.DatasetSpec`), so configs never choose one.
Importing this package is cheap: MONAI is only imported when a segmentation loss
or evaluation first runs.
"""

from fedml_progfed.tasks.base import REQUIRED_SCORES, Task, evaluation_mode
from fedml_progfed.tasks.classification import ClassificationTask
from fedml_progfed.tasks.segmentation import SegmentationTask

__all__ = ["REQUIRED_SCORES", "ClassificationTask", "SegmentationTask", "Task", "evaluation_mode"]
