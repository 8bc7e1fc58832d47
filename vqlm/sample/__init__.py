"""Sampling from the LM: jitted prefill + decode loop, logits processors, guidance, constraints.

`Sampler` (sampler.py) is the device-side engine over unified ids; `Generator` (api.py) turns
captions, images and videos into prompts and generated ids back into images and text.
`chat.py` prompts chat LMs; `edit.py` and `answer.py` choose the part of a reasoned edit or
answer that has few right values by the model's own likelihood.
"""

from vqlm.sample.api import (
  Continuation,
  Generator,
  caption_images,
  continue_sequence,
  continue_video,
  generate_images,
  generator_for,
)
from vqlm.sample.constraints import MODES
from vqlm.sample.processors import GREEDY, SamplingConfig, Settings
from vqlm.sample.sampler import SampleOutput, Sampler

__all__ = [
  "Continuation",
  "GREEDY",
  "Generator",
  "MODES",
  "SampleOutput",
  "Sampler",
  "SamplingConfig",
  "Settings",
  "caption_images",
  "continue_sequence",
  "continue_video",
  "generate_images",
  "generator_for",
]
