"""Preference tuning of a chat LM: DPO on pairs of its own samples, or online GRPO.

`vqlm train --config configs/tune.py:method=dpo --config.init_from=SFT_RUN --workdir OUT`
`vqlm train --config configs/tune.py:method=grpo --config.init_from=SFT_RUN --workdir OUT`

The fields, the presets and the arguments (`key=value,...`) are documented in
`vqlm/stages/tune_config.py`, where the library (and the tuning demo) builds the same config.
"""

from vqlm.stages.tune_config import get_config  # noqa: F401
