"""The train state every stage shares: a pytree that jit, sharding and Orbax all understand."""

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  """One training run's full state.

  Attributes:
    step: int32 scalar, the number of updates applied.
    params: the model's trainable parameters (a nested dict of arrays).
    opt_state: the optax state of `params`.
    extra: everything else that must survive a restart: non-trainable collections (e.g. a VQ
      layer's EMA codebook statistics under `extra["batch_stats"]`), a discriminator's params and
      optimizer state, counters such as skipped non-finite updates. A dict (may be empty).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  extra: Any
