"""A tiny training run used by tests/test_reliability.py and `python -m vqlm.bench soak`.

usage: python -m vqlm.bench.toy_run WORKDIR STEPS
Trains the toy regression model through the shared loop (checkpoint every 3 steps, async saves,
log every step) and, when it reaches STEPS, writes WORKDIR/final.npz with the parameters.
"""

import os
import sys

import jax
import numpy as np

from vqlm.data import pipeline
from vqlm.runtime import mesh as mesh_lib
from vqlm.runtime.config import DEFAULT_RULES
from vqlm.testing.toy_task import ToySource, ToyTask, identity_transform
from vqlm.train import loop


def main():
  workdir, steps = sys.argv[1], int(sys.argv[2])
  options = loop.LoopOptions(
    steps=steps, log_every=1, checkpoint_every=3, progress=False, keep_checkpoints=2
  )
  trainer = loop.Trainer(
    ToyTask(width=64), mesh=mesh_lib.make_mesh({"data": -1}), rules=DEFAULT_RULES, options=options
  )
  data = pipeline.make_iterator(
    ToySource(), global_batch_size=16, transform=identity_transform, seed=0, num_threads=1
  )
  state = loop.run(trainer, data_iter=data, workdir=workdir, log_fn=lambda m: print(m, flush=True))
  if int(state.step) == steps:
    params = {
      jax.tree_util.keystr(p): np.asarray(x)
      for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
    }
    np.savez(os.path.join(workdir, "final.npz"), **params)
    print("finished", flush=True)


if __name__ == "__main__":
  main()
