"""The tokenizer stage's state survives a checkpoint round trip exactly (VQ extras included)."""

import jax
import numpy as np

from vqlm.runtime import mesh as mesh_lib
from vqlm.runtime.checkpoint import Checkpointer, to_numpy
from vqlm.stages import tokenizer as tokenizer_stage
from vqlm.stages.tokenizer_config import get_config


def test_save_restore_gives_identical_next_step(tmp_path):
  config = get_config("size=tiny")
  trainer = tokenizer_stage.build_trainer(config, progress=False)
  rng = np.random.default_rng(0)
  batches = [{"image": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)} for _ in range(3)]
  glob = [mesh_lib.global_batch(b, trainer.mesh) for b in batches]
  state = trainer.init_state(jax.random.key(0), glob[0])
  for i in range(2):
    state, _ = trainer.step(state, glob[i], jax.random.key(i))
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(2, state)
  ckpt.wait()
  target = trainer.abstract_target(glob[0])
  straight, m1 = trainer.step(state, glob[2], jax.random.key(2))
  restored = ckpt.restore(target)
  assert restored.step == 2
  resumed, m2 = trainer.step(restored.state, glob[2], jax.random.key(2))
  assert float(m1["loss"]) == float(m2["loss"])
  for a, b in zip(jax.tree.leaves(to_numpy(straight)), jax.tree.leaves(to_numpy(resumed))):
    np.testing.assert_array_equal(a, b)
  assert "batch_stats" in restored.state.extra  # The VQ's codebook statistics came back too.
