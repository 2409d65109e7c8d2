"""The community-standard evaluation: features, histograms, classifier, FPD/KPD, timing."""

from .classifier import PRESETS, classifier_test, repeated_classifier_test
from .distances import fpd, frechet_distance, kpd
from .features import apply_threshold, high_level_features
from .histograms import separation_power
from .report import EvaluationSettings, evaluate_samples, format_summary, load_for_evaluation
from .timing import benchmark_sampling

__all__ = ["PRESETS", "classifier_test", "repeated_classifier_test", "fpd", "frechet_distance",
           "kpd", "apply_threshold", "high_level_features", "separation_power",
           "EvaluationSettings", "evaluate_samples", "format_summary", "load_for_evaluation",
           "benchmark_sampling"]
