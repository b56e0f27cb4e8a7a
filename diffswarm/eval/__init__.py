"""Sample quality: a small real-data classifier (:mod:`.classifier`), Frechet distance over its
features (:mod:`.fd`) and the combined report (:mod:`.quality`)."""

from diffswarm.eval.classifier import (
    Classifier,
    ClassifierConfig,
    SmallCNN,
    classifier_path,
    default_cache_dir,
    get_classifier,
    train_classifier,
)
from diffswarm.eval.fd import frechet_distance, frechet_distance_from_stats, gaussian_stats
from diffswarm.eval.quality import QualityReport, quality_report

__all__ = [
    "Classifier",
    "ClassifierConfig",
    "QualityReport",
    "SmallCNN",
    "classifier_path",
    "default_cache_dir",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_stats",
    "get_classifier",
    "quality_report",
    "train_classifier",
]
