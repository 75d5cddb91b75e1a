"""Networks: the paper's EBM and the classifiers it secures (store/checkpoints.py reads and writes their files)."""
from .classifiers import ARCHITECTURES, Classifier, build_classifier, classifier_checkpoint, classifier_from_checkpoint
from .ebm import ACTIVATIONS, EBM, ebm_checkpoint, ebm_from_checkpoint

__all__ = ["ACTIVATIONS", "ARCHITECTURES", "EBM", "Classifier", "build_classifier", "classifier_checkpoint",
           "classifier_from_checkpoint", "ebm_checkpoint", "ebm_from_checkpoint"]
