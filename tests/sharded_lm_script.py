"""Run as a subprocess by tests/test_sharding.py (needs several devices or processes).

Modes:
  mesh  OUT          : 1 device vs (data=2, fsdp=2, tensor=2) on 8 faked devices, 3 steps each;
                       then checkpoint on 8 devices, restore on 4 and on 1, compare the next step.
  proc  OUT PID N    : one of N processes (jax.distributed on 127.0.0.1) training 3 steps on a
                       data-parallel mesh over all processes' devices; process 0 writes losses.
  single OUT         : the same 3 steps in one process on one device (the reference for `proc`).
"""

import json
import os
import sys

import jax
import numpy as np


def tiny_task():
  from vqlm.nn.transformer import Transformer, TransformerConfig
  from vqlm.train.lm_task import LMTask
  from vqlm.train.optim import make_optimizer

  model = Transformer(
    TransformerConfig(
      vocab_size=256,
      dim=64,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      mlp_dim=128,
      image_offset=128,
      image_size=128,
      grid=(4, 4),
    )
  )
  opt, _ = make_optimizer(learning_rate=1e-2, warmup_steps=1, total_steps=10, weight_decay=0.1)
  return LMTask(model=model, optimizer=opt, z_loss_weight=1e-4, image_offset=128, image_size=128)


def batches(num, batch=8, seq=32):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(num):
    tokens = rng.integers(0, 256, (batch, seq + 1)).astype(np.int32)
    weights = (rng.random((batch, seq)) > 0.2).astype(np.float32)
    out.append(
      {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_weights": weights,
        "segment_ids": np.ones((batch, seq), np.int32),
        "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
      }
    )
  return out


def trainer_on(devices, shape):
  from vqlm.runtime import mesh as mesh_lib
  from vqlm.runtime.config import DEFAULT_RULES
  from vqlm.train import loop

  mesh = mesh_lib.make_mesh(shape, devices=devices)
  return loop.Trainer(
    tiny_task(), mesh=mesh, rules=DEFAULT_RULES, options=loop.LoopOptions(steps=10, progress=False)
  )


def local_slice(batch, pid, n):
  return {k: v[pid * len(v) // n : (pid + 1) * len(v) // n] for k, v in batch.items()}


def train(trainer, data, state=None, pid=0, n=1, start=0):
  from vqlm.runtime import mesh as mesh_lib

  if state is None:
    state = trainer.init_state(
      jax.random.key(0), mesh_lib.global_batch(local_slice(data[0], pid, n), trainer.mesh)
    )
  losses = []
  for i, b in enumerate(data):
    state, metrics = trainer.step(
      state, mesh_lib.global_batch(local_slice(b, pid, n), trainer.mesh), jax.random.key(start + i)
    )
    losses.append(float(metrics["loss"]))
  return state, losses


def params_np(state):
  from jax.experimental import multihost_utils

  return [
    np.asarray(multihost_utils.process_allgather(x, tiled=True))
    for x in jax.tree.leaves(state.params)
  ]


def main():
  mode, out = sys.argv[1], sys.argv[2]
  result = {}
  if mode == "mesh":
    from vqlm.runtime.checkpoint import Checkpointer

    devices = jax.devices()
    assert len(devices) == 8, devices
    data = batches(4)
    s1, l1 = train(trainer_on(devices[:1], {"data": 1}), data[:3])
    t8 = trainer_on(devices, {"data": 2, "fsdp": 2, "tensor": 2})
    s8, l8 = train(t8, data[:3])
    p1, p8 = params_np(s1), params_np(s8)
    result["losses_1"], result["losses_8"] = l1, l8
    # Relative difference of each parameter tensor, ||a - b|| / ||a||, and the elementwise
    # max |a - b| / max |a|. The latter is noisier: Adam turns float32 summation-order noise in
    # gradients near its epsilon (rarely seen vocabulary rows) into ~1e-5 of an update.
    result["param_rel_diff"] = max(
      float(np.linalg.norm(a - b) / (np.linalg.norm(a) + 1e-12)) for a, b in zip(p1, p8)
    )
    result["param_max_diff"] = max(
      float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12)) for a, b in zip(p1, p8)
    )
    ckpt = Checkpointer(os.path.join(out + "_ckpt"), async_save=False)
    ckpt.save(3, s8)
    ckpt.wait()
    _, next8 = train(t8, data[3:], state=s8, start=3)
    for name, devs, shape in (
      ("4", devices[:4], {"data": 2, "tensor": 2}),
      ("1", devices[:1], {"data": 1}),
    ):
      t = trainer_on(devs, shape)
      from vqlm.runtime import mesh as mesh_lib

      target = t.abstract_target(mesh_lib.global_batch(data[0], t.mesh))
      restored = ckpt.restore(target)
      _, nxt = train(t, data[3:], state=restored.state, start=3)
      result[f"next_loss_{name}"] = nxt[0]
    result["next_loss_8"] = next8[0]
    ckpt.close()
  elif mode == "proc":
    pid, n = int(sys.argv[3]), int(sys.argv[4])
    jax.distributed.initialize(os.environ["COORD"], num_processes=n, process_id=pid)
    t = trainer_on(jax.devices(), {"data": -1})
    state, losses = train(t, batches(3), pid=pid, n=n)
    result["losses"] = losses
    result["params"] = [p.ravel()[:16].tolist() for p in params_np(state)]
    result["process_count"] = jax.process_count()
    if pid != 0:
      return
  elif mode == "single":
    state, losses = train(trainer_on(jax.devices()[:1], {"data": 1}), batches(3))
    result["losses"] = losses
    result["params"] = [p.ravel()[:16].tolist() for p in params_np(state)]
  with open(out, "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main()
