"""The main demo's recipe: the LM configs each preset trains, and what recipes built on it keep."""

import pytest

from vqlm.demo.recipe import PRESETS, lm_config
from vqlm.stages import lm_config as lm_defaults
from vqlm.stages import lm_data


@pytest.mark.parametrize("name", list(PRESETS))
def test_lm_config_takes_the_presets_rows_and_mix(name):
  p = PRESETS[name]
  c = lm_config(p, "/run/codes")
  assert c.train.steps == p.lm_steps and c.train.seq_len == p.lm_seq_len
  assert c.data.max_text_len == p.lm_max_text_len
  weights = lm_data.mixture_weights(c)
  assert weights == lm_data.parse_mixture(p.lm_mixture)
  assert lm_data.active_modes(c) == ["t2i", "i2t"]
  assert sum(weights.values()) == pytest.approx(1.0)


def test_default_preset_trains_two_text_to_image_rows_per_caption_row():
  weights = lm_data.mixture_weights(lm_config(PRESETS["default"], "/run/codes"))
  assert weights["t2i"] / weights["i2t"] == pytest.approx(2.0, rel=0.05)


def test_recipes_without_caption_rows_keep_the_library_rows_and_mix():
  library = lm_defaults.get_config("size=small")
  c = lm_config(PRESETS["default"], "/run/codes", caption_rows=False)
  assert c.train.seq_len == library.train.seq_len
  assert c.data.max_text_len == library.data.max_text_len
  assert lm_data.mixture_weights(c) == lm_data.mixture_weights(library)


def test_tokenizer_config_takes_the_presets_shifts(tmp_path):
  import dataclasses

  from vqlm.demo.recipe import tokenizer_config

  p = dataclasses.replace(PRESETS["smoke"], tokenizer_max_shift=2, tokenizer_shift_fraction=0.25)
  c = tokenizer_config(p, str(tmp_path))
  assert (c.data.max_shift, c.data.shift_fraction) == (2, 0.25)
