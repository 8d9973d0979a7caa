"""Lightning callbacks of unigendet."""

from callbacks.requeue import SafeRequeue
from callbacks.step_log import StepLog, read_step_log

__all__ = ["SafeRequeue", "StepLog", "read_step_log"]
