"""Registry of tasks. A new task is one new module plus one import line below."""

from __future__ import annotations

from rnnbench.errors import RnnbenchError
from rnnbench.tasks.base import Batch, MetricSums, Task, TaskOptions, broadcast_batch, stack_batches

TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make `cls` available under `cls.name`."""
    TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> type[Task]:
    """The task class registered as `name`, or a one-line error listing the valid names."""
    try:
        return TASKS[name]
    except KeyError:
        raise RnnbenchError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}") from None


# Registration: importing each module runs its @register_task.
from rnnbench.tasks import adding, copy, digits, polyphonic, sequences, speech  # noqa: E402,F401

__all__ = [
    "TASKS", "Batch", "MetricSums", "Task", "TaskOptions", "broadcast_batch", "get_task", "register_task", "stack_batches",
]
