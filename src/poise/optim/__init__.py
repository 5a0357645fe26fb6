"""Drop-in ``torch.optim.Optimizer`` classes, each visibly a chain of transforms."""

from poise.optim._adapter import ConsecutiveSkipsError, NonFiniteGradientError, TransformOptimizer
from poise.optim._lowrank import LowRankOptimizer, low_rank_groups
from poise.optim.adamw import AdamW
from poise.optim.classp import CLASSP
from poise.optim.eggroll import EGGROLL, zscore_fitness
from poise.optim.frugal import FRUGAL
from poise.optim.galore import GaLoreAdamW
from poise.optim.muon import Muon
from poise.optim.psgd_kron import PSGDKron
from poise.optim.qgalore import QGaLoreAdamW
from poise.optim.soap import SOAP
from poise.optim.spam import SPAM
from poise.optim.sso import SSO, sso_step
from poise.optim.stable_spam import StableSPAM

__all__ = [
    "Muon",
    "PSGDKron",
    "EGGROLL",
    "SSO",
    "sso_step",
    "zscore_fitness",
    "CLASSP", "FRUGAL", "SOAP", "SPAM", "AdamW", "ConsecutiveSkipsError", "GaLoreAdamW", "LowRankOptimizer",
    "NonFiniteGradientError",
    "QGaLoreAdamW", "StableSPAM", "TransformOptimizer", "low_rank_groups",
]
