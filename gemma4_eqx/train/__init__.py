"""Training on top of the model: the blocked cross-entropy (`cross_entropy`), the next-token objective
(`objectives`), packing (`packing`) and a jitted optax train step (`step`); `g4.losses` gathers the losses.
`g4.train.make_train_step`, `g4.train.batch_loss`, ... are the names of the step and the objective."""

from .objectives import batch_loss, sequence_loss, sequence_nll, target_mask
from .step import FilterSpec, cast, init_optimizer, make_train_step, with_remat

__all__ = ["FilterSpec", "batch_loss", "cast", "init_optimizer", "make_train_step", "sequence_loss", "sequence_nll",
           "target_mask", "with_remat"]
