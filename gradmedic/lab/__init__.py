"""The lab: small, seeded experiments that measure each remedy (in progress: the tasks so far)."""

from gradmedic.lab.tasks import Task, adding, copy_task, digits, sequential_digits

__all__ = ["Task", "adding", "copy_task", "digits", "sequential_digits"]
