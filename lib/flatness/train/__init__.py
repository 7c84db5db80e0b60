"""Training to zero training error, as in Zhang et al. 2021 (Sec. 5, reference sheet "Networks and training").

- :func:`train_to_zero_error` (``loop``): one model on S ∪ A, stopping at the first epoch with zero error on S
  (the attack set need not be fitted), optionally over-training; per-epoch history, callbacks, divergence
  detection, and a status (``converged``, ``max_epochs``, ``diverged``).
- :func:`train_ensemble_to_zero_error` (``ensemble``): many small models of one architecture trained at once as a
  stacked ensemble (``torch.func.stack_module_state`` + ``vmap``), each model exactly as its own
  :func:`train_to_zero_error` run with the same seed and optimizer.
- :class:`Callback`, :class:`Track`, :class:`AlphaRescaleAt`, :class:`Checkpoint` (``callbacks``): hooks
  ``on_train_begin``/``on_step``/``on_epoch``/``on_train_end`` shared by both loops.
- :data:`OPTIMIZERS`, :func:`make_optimizer` (``optim``): optimizers by name with the reference defaults.
"""

from .callbacks import AlphaRescaleAt, Callback, Checkpoint, Track
from .ensemble import EnsembleResult, EnsembleState, train_ensemble_to_zero_error
from .loop import DIVERGENCE_FACTOR, TrainResult, TrainState, divergence_threshold, train_to_zero_error
from .optim import (OPTIMIZERS, EntropySGD, FunctionalOptimizer, OptimizerSpec, functional_optimizer,
                    list_optimizers, make_optimizer, optimizer_defaults, optimizer_table)

__all__ = ["OPTIMIZERS", "make_optimizer", "OptimizerSpec", "list_optimizers", "optimizer_defaults",
           "optimizer_table", "EntropySGD", "FunctionalOptimizer", "functional_optimizer",
           "TrainState", "TrainResult", "train_to_zero_error",
           "DIVERGENCE_FACTOR", "divergence_threshold",
           "EnsembleResult", "EnsembleState", "train_ensemble_to_zero_error",
           "Callback", "Track", "AlphaRescaleAt", "Checkpoint"]
