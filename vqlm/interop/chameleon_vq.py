"""Chameleon's VQ image tokenizer (transformers' `ChameleonVQVAE`) as vqlm parameters.

transformers ships Chameleon's VQ as encoder + `quant_conv` + quantizer only (no decoder), so
`convert(HFCheckpoint)` gives an encode-only tokenizer (`decoder.kind = "none"`: `decode`
refuses in one line) unless the checkpoint also has decoder weights (`decoder.*` next to
`encoder.*`, as Anole's checkpoints carry the VQGAN decoder), in either order of `decoder.up.{k}`
(transformers' lowest resolution first or taming's highest first). Codes are transformers' exactly:
the argmin of the Euclidean distance between the raw `quant_conv` output and the raw codebook;
decoding looks up raw codebook rows, as Chameleon's taming VQGAN does. It reads a
`ChameleonVQVAE` directory or a whole `ChameleonForConditionalGeneration` one (weights under
`model.vqmodel.`, config under `vq_config`); the full Chameleon import (the LM and its BPE image
vocabulary) is assembled elsewhere from this `convert`.
"""

from typing import Any

from vqlm.interop.checkpoint_files import HFCheckpoint
from vqlm.interop.janus_vq import find_prefix, taming_vq, vq_config

FORMAT = "transformers ChameleonVQVAE"

# ChameleonVQVAEConfig defaults (a saved config.json may leave them out).
DEFAULTS = {
  "embed_dim": 256,
  "num_embeddings": 8192,
  "double_latent": False,
  "latent_channels": 256,
  "resolution": 512,
  "in_channels": 3,
  "base_channels": 128,
  "channel_multiplier": [1, 1, 2, 2, 4],
  "num_res_blocks": 2,
  "attn_resolutions": None,
  "attn_type": "vanilla",
}


def has_decoder(ckpt: HFCheckpoint) -> bool:
  """Whether the checkpoint carries the VQGAN decoder's weights (Anole does, Chameleon not)."""
  return f"{find_prefix(ckpt)}decoder.conv_in.weight" in ckpt


def convert(ckpt: HFCheckpoint) -> tuple[dict[str, Any], dict[str, Any]]:
  """A `ChameleonVQVAE` (or whole Chameleon / Anole) checkpoint -> (ImageTokenizer kwargs,
  {"params", "batch_stats"} of `Lazy` leaves and arrays); encode-only without decoder weights."""
  prefix = find_prefix(ckpt)
  c = vq_config(ckpt, DEFAULTS)
  decoder = f"{prefix}decoder.conv_in.weight" in ckpt
  return taming_vq(ckpt, prefix, c, lookup_normalize=False, decoder=decoder)


def image_size(ckpt: HFCheckpoint) -> int:
  """The image side Chameleon's VQ encodes (`resolution`, 512)."""
  return int(vq_config(ckpt, DEFAULTS)["resolution"])
