"""Task registry: task_name in the task config -> Task class (precision), or a performance task's name
(task_type performance / performance_maxbs: modeltest/tasks/performance.py)."""

from __future__ import annotations

from ..errors import ModelTestError, unknown_name
from .base import Sample, Task
from .coco_caption import CocoCaption
from .performance import PERFORMANCE_TASKS
from .textvqa import TextVQA

TASKS: dict[str, type[Task]] = {"textvqa": TextVQA, "coco_caption": CocoCaption}


def get_task(name: str) -> type[Task]:
    if name in PERFORMANCE_TASKS:
        raise ModelTestError(f"task_name: {name} is a performance task: set task_type: performance (or "
                             "performance_maxbs)")  # fmt: skip
    if name not in TASKS:
        raise unknown_name("task", name, TASKS)
    return TASKS[name]


__all__ = ["PERFORMANCE_TASKS", "TASKS", "CocoCaption", "Sample", "Task", "TextVQA", "get_task"]
