"""EAGLE-style feature-level drafter: the drafter and its cache (`drafter`), its training and
held-out measurements (`training`, `calibration`)."""

from lmforge.eagle.drafter import FROZEN, TRAINED, EagleDrafter, EagleShape, load_eagle
from lmforge.eagle.training import acceptance_per_depth, eagle_loss, greedy_continuations, initial_eagle, train_eagle

__all__ = ["FROZEN", "TRAINED", "EagleDrafter", "EagleShape", "acceptance_per_depth", "eagle_loss",
           "greedy_continuations", "initial_eagle", "load_eagle", "train_eagle"]
