"""Lightning callbacks of unigendet."""

from callbacks.explanations import ForensicExplanations
from callbacks.requeue import SafeRequeue
from callbacks.step_log import StepLog, read_step_log

__all__ = ["ForensicExplanations", "SafeRequeue", "StepLog", "read_step_log"]
