"""Built-in CPU-sized workloads."""

from poise.tasks.digits import Stream, Task, load_stream
from poise.tasks.models import CNN, MLP, build_model

__all__ = ["CNN", "MLP", "Stream", "Task", "build_model", "load_stream"]
