"""Subprocess of tests/test_runs.py (8 faked CPU devices): trains a tiny LM with fsdp=8, loads it
back sharded the same way, and saves its parameters, logits and greedy tokens for the 1-device
side of the test. Usage: runs_fsdp_script.py TOKENIZER_RUN CODES LM_RUN OUT.npz"""

import sys

import jax
import numpy as np

PROMPT = "a large red circle"


def reference_outputs(run) -> dict[str, np.ndarray]:
  """Logits of a fixed prompt and greedy continuations (shared with the 1-device side)."""
  from vqlm.runtime import mesh as mesh_lib
  from vqlm.sample.processors import GREEDY, SamplingConfig

  gen = run.generator()
  ids = np.asarray([gen.prompt_ids([PROMPT])], np.int32)
  positions = np.arange(ids.shape[1], dtype=np.int32)[None]
  with mesh_lib.activate(run.mesh, run.rules):
    logits = jax.jit(
      lambda p, t, pos: run.model.apply(
        {"params": p}, t, positions=pos, segment_ids=jax.numpy.ones_like(t)
      )
    )(run.params, ids, positions)
  greedy = SamplingConfig(text=GREEDY, image=GREEDY)
  image = gen.continue_sequence([[PROMPT]], max_new_tokens=66, mode="image", sampling=greedy)[0]
  text = gen.continue_sequence([[PROMPT]], max_new_tokens=8, mode="text", sampling=greedy)[0]
  logits = logits[0] if isinstance(logits, tuple) else logits
  return {"logits": np.asarray(logits, np.float32), "image_ids": image.ids, "text_ids": text.ids}


def flat_params(params) -> dict[str, np.ndarray]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  return {"param/" + jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def main(tok: str, codes: str, lm: str, out: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  from vqlm import cli
  from vqlm.runs import LMRun

  assert (
    cli.main(
      [
        "vqlm",
        "train",
        "--config",
        "configs/lm.py:size=tiny",
        f"--config.data.codes={codes}",
        f"--config.data.tokenizer={tok}",
        "--config.mesh.shape.data=1",
        "--config.mesh.shape.fsdp=8",
        "--config.train.batch_size=8",
        "--config.train.steps=6",
        "--workdir",
        lm,
        "--progress=false",
      ]
    )
    == 0
  )
  run = LMRun(lm, mesh_shape={"data": 1, "fsdp": 8})
  table = run.params["embed"]["embedding"]
  assert len(table.sharding.device_set) == 8 and not table.sharding.is_fully_replicated
  np.savez(out, **flat_params(run.params), **reference_outputs(run))


if __name__ == "__main__":
  main(*sys.argv[1:])
