"""vqlm: teach a language model to draw.

`vqlm.load(workdir)` returns a trained run ready to use: a `TokenizerRun` (encode / decode images)
or an `LMRun` (generate images, caption, continue documents and videos). See docs/python-api.md.
"""


def load(workdir: str, **kwargs):
  """The trained run in `workdir` (`vqlm.runs.load`): `TokenizerRun` or `LMRun`."""
  from vqlm.runs import load as load_run  # Imported on use: `import vqlm` stays light.

  return load_run(workdir, **kwargs)


__all__ = ["load"]
