"""Lightning callbacks of unigendet."""

from callbacks.detection_metrics import DetectionMetrics
from callbacks.explanations import ForensicExplanations
from callbacks.generation_quality import GenerationQuality
from callbacks.image_samples import ImageSamples
from callbacks.progress_report import ProgressReport
from callbacks.requeue import SafeRequeue
from callbacks.sample_log import SampleLog, read_sample_log
from callbacks.step_log import StepLog, read_step_log
from callbacks.throughput import Throughput

__all__ = ["DetectionMetrics", "ForensicExplanations", "GenerationQuality", "ImageSamples", "ProgressReport",
           "SafeRequeue", "SampleLog", "StepLog", "Throughput", "read_sample_log",
           "read_step_log"]
