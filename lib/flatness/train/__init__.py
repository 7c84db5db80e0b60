"""Training to zero training error, as in Zhang et al. 2021 (Sec. 5, reference sheet "Networks and training").

- :func:`train_to_zero_error` (``loop``): one model on S ∪ A, stopping at the first epoch with zero error on S
  (the attack set need not be fitted), optionally over-training; per-epoch history, callbacks, and a status
  (``converged``, ``max_epochs``, ``diverged``).
- :func:`train_ensemble_to_zero_error` (``ensemble``): many small models of one architecture trained at once as a
  stacked ensemble (``torch.func.stack_module_state`` + ``vmap``).
- :data:`OPTIMIZERS`, :func:`make_optimizer` (``optim``): optimizers by name with the reference defaults.
"""

from .ensemble import EnsembleResult, train_ensemble_to_zero_error
from .loop import TrainResult, TrainState, train_to_zero_error
from .optim import OPTIMIZERS, make_optimizer

__all__ = ["OPTIMIZERS", "make_optimizer", "TrainState", "TrainResult", "train_to_zero_error",
           "EnsembleResult", "train_ensemble_to_zero_error"]
