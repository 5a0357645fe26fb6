"""Old path of the knowledge-insertion probes, kept so existing imports work: the probes
(``keyword_logprob``, ``priming_score``, ``memorization_score``) measure and live in
:mod:`poise.measure.priming`; ``stepping_stone`` builds data and lives in :mod:`poise.tasks.facts`."""

from poise.measure.priming import keyword_logprob, memorization_score, priming_score
from poise.tasks.facts import stepping_stone

__all__ = ["keyword_logprob", "memorization_score", "priming_score", "stepping_stone"]
