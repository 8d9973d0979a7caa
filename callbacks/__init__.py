"""Lightning callbacks of unigendet."""

from callbacks.detection_metrics import DetectionMetrics
from callbacks.explanations import ForensicExplanations
from callbacks.requeue import SafeRequeue
from callbacks.step_log import StepLog, read_step_log

__all__ = ["DetectionMetrics", "ForensicExplanations", "SafeRequeue", "StepLog", "read_step_log"]
