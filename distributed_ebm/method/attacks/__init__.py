"""Attacks on any classifier behind any purifier, with the paper's counting protocol.

engine.py: the protocol loop (`Attack`); modes.py: one class per `attack.mode`;
apgd.py: how the iterates move; pgd.py: the geometry; ensemble.py: the worst case over attacks.
The statistics of the records (Wilson intervals, summaries) are in results/records.py."""
from .apgd import UPDATERS
from .engine import NEVER, Attack, ImageRecord, evaluation_points
from .ensemble import EnsembleAttack, EnsembleRecord
from .modes import MODES
from .pgd import NORMS, ascent_step, project, random_start

__all__ = ["MODES", "NORMS", "UPDATERS", "NEVER", "Attack", "EnsembleAttack", "EnsembleRecord", "ImageRecord",
           "evaluation_points",
           "ascent_step", "project", "random_start"]
