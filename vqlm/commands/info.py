"""`vqlm info --config configs/lm.py:size=base`: the model's parameter count (and its breakdown)."""

import jax
import numpy as np

from vqlm.commands import flags as flag_lib


def main(argv: list[str]) -> int:
  fv = flag_lib.parse(
    argv,
    lambda f: f.DEFINE_integer(
      "vocab_size", 0, "LM vocabulary size (default: the size's nominal vocabulary)"
    ),
    config=True,
  )
  config = flag_lib.require_config(fv)
  if config.stage == "lm":
    from vqlm.nn.presets import NOMINAL_VOCAB
    from vqlm.nn.transformer import TransformerConfig, param_counts
    from vqlm.runtime.config import as_kwargs

    vocab = fv.vocab_size or NOMINAL_VOCAB.get(config.get("size", ""), 32768)
    counts = param_counts(TransformerConfig(**as_kwargs(config.model), vocab_size=vocab))
    for name, n in counts.items():
      print(f"  {name}: {n:,}")
    total = sum(counts.values())
    print(f"lm size={config.get('size')} vocab={vocab}: {total:,} parameters")
  else:
    from vqlm.nn.image_tokenizer import ImageTokenizer
    from vqlm.runtime.config import as_kwargs

    model = ImageTokenizer(**as_kwargs(config.model))
    size = config.data.image_size
    shapes = jax.eval_shape(
      lambda: model.init(
        {"params": jax.random.key(0), "sample": jax.random.key(1), "restart": jax.random.key(2)},
        jax.numpy.zeros((1, size, size, 3)),
        train=False,
      )
    )
    for name, tree in shapes["params"].items():
      print(f"  {name}: {sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)):,}")
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
    print(f"image tokenizer {size}x{size}: {total:,} parameters")
  return 0
