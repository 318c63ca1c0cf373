"""The lab: small, seeded experiments that measure each remedy and judge the common claims over seeds."""

from gradmedic.lab.claims import CLAIMS, Verdict, group_results, judge
from gradmedic.lab.experiment import run_experiment
from gradmedic.lab.models import CNNSpec, MLPSpec, RNNSpec, build_cnn, build_mlp, build_rnn
from gradmedic.lab.publish import publish
from gradmedic.lab.runner import RunSummary, run_suite
from gradmedic.lab.store import Store, run_key
from gradmedic.lab.suites import SUITES, Experiment, Suite, get_suite
from gradmedic.lab.tasks import Task, adding, copy_task, digits, recall, sequential_digits
from gradmedic.lab.transformer import TransformerSpec, build_transformer

__all__ = ["CLAIMS", "SUITES", "CNNSpec", "Experiment", "MLPSpec", "RNNSpec", "RunSummary", "Store", "Suite", "Task",
           "TransformerSpec", "Verdict", "adding", "build_cnn", "build_mlp", "build_rnn", "build_transformer",
           "copy_task", "digits", "get_suite", "group_results", "judge", "publish", "recall", "run_experiment",
           "run_key", "run_suite", "sequential_digits"]
