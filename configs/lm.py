"""Transformer LM configs (stage 2: interleaved text/image sequences).

`vqlm train --config configs/lm.py:size=small --workdir RUN`

The fields, the size table and the arguments (`key=value,...`) are documented in
`vqlm/stages/lm_config.py`, where the library (and the built-in demo) builds the same config.
"""

from vqlm.stages.lm_config import get_config  # noqa: F401
