import numpy as np
from test_sampler import *

def test_dbg(sampler):
  prompts = [[BOS, 2], [BOS, 4, 5], [BOS, 6]]
  kw = dict(max_new_tokens=20, mode="interleaved")
  a = sampler(prompts, seed=7, **kw)
  alone = sampler([prompts[1]], seed=7, row_seeds=[1], batch_size=3, **kw)
  print(a.tokens, alone.tokens)
  assert False
