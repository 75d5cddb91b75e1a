"""Attacks on any classifier behind any purifier, with the paper's counting protocol."""
from .engine import Attack, ImageRecord, accuracy_curve, evaluation_points, summarize, wilson_interval
from .ensemble import EnsembleAttack, EnsembleRecord
from .pgd import ascent_step, project, random_start

__all__ = ["Attack", "EnsembleAttack", "EnsembleRecord", "ImageRecord", "accuracy_curve", "evaluation_points", "summarize", "wilson_interval",
           "ascent_step", "project", "random_start"]
