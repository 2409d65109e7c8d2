"""The community-standard evaluation: features, histograms, classifier, FPD/KPD, PRDC, timing."""

from .classifier import (
    OFFICIAL_SPLIT_SIZES,
    PRESETS,
    build_classifier,
    classifier_test,
    get_preset,
    repeated_classifier_test,
    split_sizes,
)
from .distances import fpd, frechet_distance, kpd, prdc
from .features import apply_threshold, high_level_features
from .histograms import official_feature_bins, separation_power
from .report import (
    METRICS,
    EvaluationSettings,
    evaluate_samples,
    format_summary,
    load_for_evaluation,
)
from .timing import benchmark_sampling

__all__ = ["OFFICIAL_SPLIT_SIZES", "PRESETS", "build_classifier", "classifier_test",
           "get_preset", "repeated_classifier_test", "split_sizes", "fpd", "frechet_distance",
           "kpd", "prdc", "apply_threshold", "high_level_features", "official_feature_bins",
           "separation_power", "METRICS", "EvaluationSettings", "evaluate_samples",
           "format_summary", "load_for_evaluation", "benchmark_sampling"]
