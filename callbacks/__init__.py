"""Lightning callbacks of unigendet."""

from callbacks.detection_metrics import DetectionMetrics
from callbacks.explanations import ForensicExplanations
from callbacks.requeue import SafeRequeue
from callbacks.step_log import StepLog, read_step_log
from callbacks.throughput import Throughput

__all__ = ["DetectionMetrics", "ForensicExplanations", "SafeRequeue", "StepLog", "Throughput", "read_step_log"]
