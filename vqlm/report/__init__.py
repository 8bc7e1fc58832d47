"""A self-contained HTML report of a run: `RUN/report.html`.

`write_report(workdir)` renders what is in `workdir`, whichever of three it is (`run_kind`):

- an image-tokenizer run (`config.json` with stage "tokenizer"): what the run is, its eval.json
  tables, every training curve of `metrics.jsonl`, the codebook snapshots
  (`samples/codebook_*.npy`) of a discrete bottleneck, the reconstruction grids
  (`samples/recon_*.png`) and, for continuous bottlenecks, the decoded prior grids
  (`samples/prior_samples.png`, `samples/random_latents.png`);
- an LM run (stage "lm"): what the run is, its eval.json tables (text to image, image to text,
  scene FD, FID), its train and validation curves, and the sample grids and captions in `samples/`;
- the demo's directory (`vqlm.demo`: `tokenizer/`, `lm/`, `samples/`, `eval.json`): the demo's
  evaluation, curves, codebook, reconstructions, samples and stage timings.

Every image is inlined as a base64 PNG data URI and the only styling is an inline <style> block:
the file has no external links, scripts or fonts and can be viewed offline. Anything a stage did
not produce is reported as "not run". Each section is an <h2> with a stable id (`PAGE_SECTIONS`).

Modules: `pages` (the pages, where they are written), `tables` (eval.json, run facts, timings),
`sections` (curves, codebook, images), `figures` (matplotlib), `common` (HTML helpers).
"""

from vqlm.report.common import NOT_RUN, png_data_uri
from vqlm.report.figures import codebook_projection_figure, nearest_code_image, pca_basis
from vqlm.report.pages import (
  PAGE_SECTIONS,
  REPORT_FILE,
  SECTIONS,
  build_report,
  run_kind,
  save_prompt_figure,
  write_report,
)
from vqlm.report.sections import (
  codebook_section,
  image_to_text_section,
  losses_section,
  reconstructions_section,
  split_grid_rows,
  text_to_image_section,
)
from vqlm.report.tables import summary_section

__all__ = [
  "NOT_RUN",
  "PAGE_SECTIONS",
  "REPORT_FILE",
  "SECTIONS",
  "build_report",
  "codebook_projection_figure",
  "codebook_section",
  "image_to_text_section",
  "losses_section",
  "nearest_code_image",
  "pca_basis",
  "png_data_uri",
  "reconstructions_section",
  "run_kind",
  "save_prompt_figure",
  "split_grid_rows",
  "summary_section",
  "text_to_image_section",
  "write_report",
]
