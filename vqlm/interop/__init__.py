"""Public checkpoints in and out: import Hugging Face style directories (Llama, Chameleon, Janus,
diffusers `VQModel`) as vqlm run directories, export vqlm LMs as Llama directories, and convert
the reference networks of the metrics (FID's Inception, LPIPS). Reading needs no torch; the
parity tests against the reference libraries need the `interop` extra.
"""
