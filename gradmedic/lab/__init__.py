"""The lab: small, seeded experiments that measure each remedy (in progress: tasks, model families, results store)."""

from gradmedic.lab.models import CNNSpec, MLPSpec, RNNSpec, build_cnn, build_mlp, build_rnn
from gradmedic.lab.store import Store, run_key
from gradmedic.lab.tasks import Task, adding, copy_task, digits, sequential_digits

__all__ = ["CNNSpec", "MLPSpec", "RNNSpec", "Store", "Task", "adding", "build_cnn", "build_mlp", "build_rnn",
           "copy_task", "digits", "run_key", "sequential_digits"]
