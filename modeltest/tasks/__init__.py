"""Task registry: task_name in the task config -> Task class."""

from __future__ import annotations

from ..errors import unknown_name
from .base import Sample, Task
from .coco_caption import CocoCaption
from .textvqa import TextVQA

TASKS: dict[str, type[Task]] = {"textvqa": TextVQA, "coco_caption": CocoCaption}


def get_task(name: str) -> type[Task]:
    if name not in TASKS:
        raise unknown_name("task", name, TASKS)
    return TASKS[name]


__all__ = ["TASKS", "CocoCaption", "Sample", "Task", "TextVQA", "get_task"]
