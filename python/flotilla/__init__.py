"""Flotilla's Python client: a training process started by
``flotilla worker ... --exec -- python train.py`` reports its steps to the
worker, saves its variables at the checkpoints the coordinator schedules, and
gets them back on a restore.

    import flotilla

    ctx = flotilla.init()
    state = ctx.restore(like={"model/w": ("F32", [4, 4])})  # None on a fresh start
    for step in range(ctx.start_step, total_steps):
        train_one_step()
        if ctx.step_done(step + 1):
            ctx.save({"model/w": w})
    ctx.finish(digest)

Adapters: :mod:`flotilla.torch` (PyTorch modules and optimizers) and
:mod:`flotilla.tensorflow` (``tf.train.Checkpoint``); importing them imports
the framework, importing ``flotilla`` does not.
"""

from ._context import Context, init
from ._errors import FlotillaError, ModelMismatch, RestoreRefused, WorkerGone
from ._tensors import Tensor, digest, dtype_name

__all__ = [
    "Context",
    "FlotillaError",
    "ModelMismatch",
    "RestoreRefused",
    "Tensor",
    "WorkerGone",
    "digest",
    "dtype_name",
    "init",
]
__version__ = "0.1.0"

for _error in (FlotillaError, ModelMismatch, RestoreRefused, WorkerGone):
    _error.__module__ = __name__  # tracebacks say flotilla.ModelMismatch
del _error
