"""Image tokenizer configs (stage 1: autoencoder, VAE, VQ-VAE, FSQ, VQ-GAN).

`vqlm train --config configs/tokenizer.py:size=small --workdir RUN`

The fields, the size table and the arguments (`key=value,...`) are documented in
`vqlm/stages/tokenizer_config.py`, where the library (and the built-in demo) builds the same config.
"""

from vqlm.stages.tokenizer_config import get_config  # noqa: F401
