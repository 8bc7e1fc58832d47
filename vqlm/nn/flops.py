"""Model FLOPs of a decoder-only transformer (for MFU and compile-time estimates)."""


def flops_per_token(
  num_params: int, *, num_layers: int, num_heads: int, head_dim: int, seq_len: int
) -> float:
  """Training FLOPs per token: `6 N` for the matmuls of forward + backward over N parameters,
  plus `12 L H Dh S` for attention scores and values over a context of S (PaLM, appendix B)."""
  return 6.0 * num_params + 12.0 * num_layers * num_heads * head_dim * seq_len
