"""Old path of :mod:`poise.runs.kinds.priming`, kept so existing imports work: this name is
the same module object (monkeypatching either patches both)."""

import sys

from poise.runs.kinds import priming as _kind

sys.modules[__name__] = _kind
