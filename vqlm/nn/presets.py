"""Model shapes by size name: what a size *is* (widths, depths, heads), apart from how it is
trained (learning rate, steps, batch, mesh: `vqlm.stages.lm_config`,
`vqlm.stages.tokenizer_config`).
"""

# Llama-style decoder shapes. `tiny` is for tests (seconds on CPU); `small` is the CPU demo's LM;
# `7b` is shaped like Chameleon-7B (multi-head attention with QK-norm, untied head).
TRANSFORMER_SIZES = {
  "tiny": dict(
    dim=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=192,
    qk_norm=False,
    tie_embeddings=True,
  ),
  "small": dict(
    dim=256,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=768,
    qk_norm=False,
    tie_embeddings=True,
  ),
  "base": dict(
    dim=768,
    num_layers=12,
    num_heads=12,
    num_kv_heads=12,
    mlp_dim=2048,
    qk_norm=True,
    tie_embeddings=True,
  ),
  "large": dict(
    dim=1024,
    num_layers=24,
    num_heads=16,
    num_kv_heads=16,
    mlp_dim=2816,
    qk_norm=True,
    tie_embeddings=True,
  ),
  "xl": dict(
    dim=2048,
    num_layers=24,
    num_heads=16,
    num_kv_heads=16,
    mlp_dim=5632,
    qk_norm=True,
    tie_embeddings=False,
  ),
  "7b": dict(
    dim=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    mlp_dim=11008,
    qk_norm=True,
    tie_embeddings=False,
  ),
}

# Vocabulary sizes that parameter counts and ahead-of-time compiles assume when no run exists
# (a real run's size comes from its Vocab).
NOMINAL_VOCAB = {
  "tiny": 512,
  "small": 1536,
  "base": 32768,
  "large": 32768,
  "xl": 32768,
  "7b": 65536,
}

# Conv autoencoder shapes of the image tokenizer (encoder/decoder widths, depth, latent and
# codebook sizes) and the resolution each is made for.
AUTOENCODER_SIZES = {
  # 32x32 images, factor 4 -> 8x8 codes, a few thousand parameters.
  "tiny": dict(
    image_size=32,
    channels=8,
    channel_multipliers=(1, 1, 2),
    num_res_blocks=0,
    attention=False,
    latent_dim=8,
    codebook_size=32,
    code_dim=4,
  ),
  # The CPU demo: 32x32, factor 4 -> 8x8 = 64 image tokens.
  "small": dict(
    image_size=32,
    channels=32,
    channel_multipliers=(1, 1, 2),
    num_res_blocks=0,
    attention=False,
    latent_dim=16,
    codebook_size=512,
    code_dim=16,
  ),
  # LlamaGen-style 256x256, factor 16 -> 16x16, 16384 codes of dim 8.
  "base": dict(
    image_size=256,
    channels=128,
    channel_multipliers=(1, 1, 2, 2, 4),
    num_res_blocks=2,
    attention=True,
    latent_dim=256,
    codebook_size=16384,
    code_dim=8,
  ),
  "large": dict(
    image_size=256,
    channels=128,
    channel_multipliers=(1, 2, 2, 4, 4),
    num_res_blocks=3,
    attention=True,
    latent_dim=256,
    codebook_size=16384,
    code_dim=8,
  ),
  # DALL-E 1 shaped: 256x256, factor 8 -> 32x32 grid, 8192 codes.
  "dalle": dict(
    image_size=256,
    channels=128,
    channel_multipliers=(1, 1, 2, 4),
    num_res_blocks=2,
    attention=True,
    latent_dim=256,
    codebook_size=8192,
    code_dim=32,
  ),
}
