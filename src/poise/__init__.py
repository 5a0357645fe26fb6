"""poise: stable model updates for PyTorch.

Stages of an update: sample, objective, transform, integrate; and measure what it did.
This release holds the measure stage (:mod:`poise.measure`), continual-learning
strategies as hooks around any training loop (:mod:`poise.continual`), built-in
CPU workloads (:mod:`poise.tasks`) and the workbench (``poise run``).
"""

from poise._registry import get, names

__version__ = "0.1.0"
__all__ = ["get", "names", "__version__"]
