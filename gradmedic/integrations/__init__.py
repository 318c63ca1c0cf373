"""Where users already train: Hugging Face ``Trainer``, Lightning, TensorBoard.

Each submodule imports its framework only when used; ``import gradmedic`` (and this package) imports
none of them. ``from gradmedic.integrations.huggingface import GradmedicCallback``,
``from gradmedic.integrations.lightning import GradmedicCallback``,
``from gradmedic.integrations.tensorboard import TensorBoardSink, write_trace``;
``gradmedic.integrations.distributed`` is used by the Monitor itself under torch.distributed.
"""

__all__: list[str] = []
