#!/usr/bin/env bash
# Environment for vqlm training on NVIDIA GPUs; sourced by gpu_node.sh and slurm_gpu.sh.
#
# XLA_FLAGS: only flags defined in XLA's debug_options_flags.cc (an unknown flag aborts the
# process at start-up; tests/test_launch.py checks these against the installed jaxlib). Flags
# already in XLA_FLAGS are kept and come last, so a user's own value of a flag wins.
#   --xla_gpu_enable_latency_hiding_scheduler=true
#       schedule asynchronous collectives (FSDP all-gathers / reduce-scatters, data-parallel
#       all-reduces) early so they run concurrently with independent compute.
#   --xla_gpu_enable_pipelined_all_gather=true, ..._reduce_scatter=true, ..._all_reduce=true
#       inside the scanned layer loop (config.model.scan_layers), move layer i+1's parameter
#       all-gather (and layer i-1's gradient reduce-scatter / all-reduce) into iteration i, so
#       it overlaps with layer i's compute.
#   --xla_gpu_enable_while_loop_double_buffering=true
#       unroll the layer loop by two with double-buffered loop state, which gives the scheduler
#       room to overlap the pipelined collectives above.
#   --xla_gpu_all_gather_combine_threshold_bytes, ..._reduce_scatter_..., ..._all_reduce_...
#       merge collectives into one up to this many bytes (XLA's defaults are far smaller).
#       At 128 MiB one layer's float32 weights of the large config (~51 MB) travel in one
#       all-gather rather than one per tensor; xl's (~205 MB) in two.
#   --xla_gpu_enable_triton_gemm=false
#       matrix multiplications through cuBLAS(Lt) rather than Triton-generated kernels; for
#       the large bf16 GEMMs of these models cuBLAS is usually as fast and compiles faster
#       (JAX's GPU performance tips). Remove it to compare on your model.
# XLA_PYTHON_CLIENT_MEM_FRACTION=0.9: let XLA's allocator take 90% of GPU memory (jax's default
# is 75%); the rest is for CUDA/NCCL workspaces.

vqlm_gpu_flags=(
  --xla_gpu_enable_latency_hiding_scheduler=true
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  --xla_gpu_enable_while_loop_double_buffering=true
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  --xla_gpu_enable_triton_gemm=false
)
export XLA_FLAGS="${vqlm_gpu_flags[*]}${XLA_FLAGS:+ $XLA_FLAGS}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
