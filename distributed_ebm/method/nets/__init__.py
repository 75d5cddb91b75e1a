"""Networks: the paper's EBM and the classifiers it secures."""
from .classifiers import Classifier, build_classifier, load_classifier, save_classifier
from .ebm import EBM, load_ebm, save_ebm

__all__ = ["EBM", "load_ebm", "save_ebm", "Classifier", "build_classifier", "load_classifier", "save_classifier"]
