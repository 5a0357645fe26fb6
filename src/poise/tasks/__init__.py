"""Built-in CPU-sized workloads."""

from poise.tasks import drift as _drift  # noqa: F401 - registers drift-digits
from poise.tasks import fscil as _fscil  # noqa: F401 - registers fscil-digits
from poise.tasks.digits import Stream, Task, load_stream
from poise.tasks.models import CNN, MLP, build_model

__all__ = ["CNN", "MLP", "Stream", "Task", "build_model", "load_stream"]
