"""Training on top of the model: blocked cross-entropy (`losses`), packing, the next-token objective and a jitted
optax train step (`step`). `g4.train.make_train_step`, `g4.train.batch_loss`, ... are the step module's names."""

from .step import (FilterSpec, batch_loss, cast, init_optimizer, make_train_step, sequence_loss, sequence_nll,
                   target_mask, with_remat)

__all__ = ["FilterSpec", "batch_loss", "cast", "init_optimizer", "make_train_step", "sequence_loss", "sequence_nll",
           "target_mask", "with_remat"]
