"""KV-cache sampling: one jitted prefill + one `lax.while_loop` that adds a token per row per step.

Static shapes throughout (no recompilation across prompts):
  * prompts are right-padded to a bucket (a multiple of `prompt_bucket`) and prefilled at
    positions `0..S-1`; each row then continues at its own length `n_r` (slot = position, see
    `vqlm.nn.attention`), so prompts of different lengths share one batch;
  * `max_new_tokens` is static; the cache ends with the `S + max_new_tokens - 1` slots the last
    step needs (rounded up to whole key panels), but starts with those of the first steps and
    grows as the loop goes (`cache_schedule`: the loop is a few `lax.while_loop`s, one per cache
    size), since a decode step reads every slot of its cache;
  * the batch may be padded to a fixed `batch_size` with inactive rows (they start done).

The loop step feeds each row's last token at its next position, takes the logits, applies
classifier-free guidance (image positions only), the modality constraints, the per-row
text/image sampling settings, draws, and advances the constraint machine. Rows that stopped emit
`<pad>`; the loop exits when every row stopped. In the "image" and "video" modes every id outside
an image run is forced, so rows draw from the image codes' logits alone, and (without
`return_logits`) the model computes only those: a third of the output projection and of the
top-k work for the demo's vocabulary. Nothing in the loop syncs with the host, so it runs
unchanged under a mesh (the model's logical sharding constraints apply).

On a mesh that splits only the batch (its `data` axis; `fsdp`, `tensor` and the rest of size 1),
rows never meet, so when the batch divides over the devices each device runs the prefill and
decode loop on its own rows (`jax.shard_map`; the weights replicated once): no collective in the
loop, and each device stops when its own rows are done. Partitioning the one loop instead
(GSPMD) gathers the KV cache writes across devices at every layer and step. The samples are
those of one device up to float rounding (a matmul over fewer rows may round a logit's last bit
differently, and a row at a near tie may then draw another code). On a CPU, one host device per
core (`jax.config.update("jax_num_cpu_devices", N)` before JAX starts) runs the shards' matmuls
side by side.

Classifier-free guidance: the conditional rows `[0, B)` and unconditional rows `[B, 2B)` (the
prompt with the caption dropped, `<bos> <boi>` as trained with caption dropout; or any given
unconditional prompts, which may hold `<pad>`: Janus's is the prompt with every id but `<bos>` and
`<boi>` replaced by `<pad>`, `pad_uncond_prompts`) run as one doubled batch; on image codes
`logits = uncond + scale * (cond - uncond)`, and both halves are fed the same sampled token. The
scale is a traced argument. In per-device loops each device holds its conditional rows, then
their unconditional twins.

Randomness: row `r` draws one uniform at step `t` from
`fold_in(fold_in(key(seed, impl="threefry2x32"), row_seeds[r]), t)`, so a row's sample depends on
its seed, not on its batch neighbours (nor on the global default PRNG implementation).
"""

from collections.abc import Sequence
import contextlib
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from vqlm.errors import UserError
from vqlm.nn import attention
from vqlm.runtime import mesh as mesh_lib
from vqlm.sample import constraints as cons
from vqlm.sample import processors
from vqlm.vocab import Vocab


@flax.struct.dataclass
class SamplerState:
  """The while-loop carry.

  Attributes:
    step: int32 scalar, tokens generated so far.
    tokens: `[B, T]` int32 generated ids (`<pad>` where not yet generated or after a stop).
    feed: `[R]` int32 the token each model row is fed next (R = B, or 2B with guidance).
    positions: `[R]` int32 its position (= cache slot).
    cache: the model's KV cache for R rows.
    row_keys: `[B]` PRNG keys.
    machine: the modality constraint state of the B rows.
    logits: `[B, T, V]` float32 logits after guidance (only with `return_logits`, else None).
  """

  step: jax.Array
  tokens: jax.Array
  feed: jax.Array
  positions: jax.Array
  cache: Any
  row_keys: jax.Array
  machine: cons.ConstraintState
  logits: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class SampleOutput:
  """Generated ids of the caller's rows.

  Attributes:
    tokens: `[B, T]` int32; `<pad>` after a row stopped.
    lengths: `[B]` int32 tokens generated per row (the stop token included).
    logits: `[B, T, V]` float32 logits after guidance, before constraints (`return_logits`).
  """

  tokens: np.ndarray
  lengths: np.ndarray
  logits: np.ndarray | None = None


def pad_uncond_prompts(prompts: Sequence[Sequence[int]], vocab: Vocab) -> list[list[int]]:
  """Janus's unconditional prompts: each prompt with every id except `<bos>` and `<boi>` replaced
  by `<pad>` (same length and positions; the pads are attended, as in its `generate`)."""
  keep = (vocab.bos_id, vocab.boi_id)
  return [[int(i) if int(i) in keep else vocab.pad_id for i in p] for p in prompts]


def bucket(n: int, multiple: int) -> int:
  """`n` rounded up to a multiple of `multiple` (the padded prompt length)."""
  return max(multiple, -(-n // multiple) * multiple)


# The decode loop is cut into at most this many segments (each compiles its own loop body).
MAX_CACHE_SEGMENTS = 8


def cache_schedule(prompt_len: int, max_new_tokens: int, block: int) -> list[tuple[int, int]]:
  """The decode loop's segments, `[(end_step, cache_slots), ...]`: the steps before `end_step`
  (after the previous segment's) run with a KV cache of `cache_slots` slots.

  Step t feeds a row's token at position `n_r - 1 + t <= prompt_len - 1 + t`, so it needs
  `prompt_len + t` slots. A decode step reads every slot of its cache, and at batch 64 that read
  is most of the step on a CPU, so instead of holding all `prompt_len + max_new_tokens - 1` slots
  from the start the cache grows `block` slots at a time (rounded up to whole key panels,
  `attention.cache_slots`; larger when more than MAX_CACHE_SEGMENTS segments would be needed).
  Each segment is its own loop, compiled for its length. `block <= 0`: one segment.
  """
  final = attention.cache_slots(prompt_len + max_new_tokens - 1)
  segments = []
  if block > 0:
    block = attention.cache_slots(max(block, -(-final // MAX_CACHE_SEGMENTS)))
    length = bucket(prompt_len + 1, block)
    while length < final:
      segments.append((length - prompt_len + 1, length))
      length += block
  return segments + [(max_new_tokens, final)]


def _generate(
  variables,
  prompt_tokens,
  prompt_lengths,
  machine,
  row_keys,
  sampling,
  cfg_scale,
  *,
  model: nn.Module,
  spec: cons.Spec,
  max_new_tokens: int,
  use_cfg: bool,
  return_logits: bool,
  cache_dtype: Any,
  cache_block: int = 0,
) -> tuple[jax.Array, jax.Array, Any]:
  """Prefill + decode loop (traced). `prompt_tokens[R, S]`, `prompt_lengths[R]` -> tokens."""
  r, s = prompt_tokens.shape
  b = machine.last.shape[0]
  t_max = max_new_tokens
  schedule = cache_schedule(s, t_max, cache_block)
  cache = model.init_cache(r, schedule[0][1], cache_dtype)
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (r, s))
  _, cache = model.apply(variables, prompt_tokens, positions=positions, cache=cache, decode=True)
  last_pos = prompt_lengths - 1
  feed = jnp.take_along_axis(prompt_tokens, last_pos[:, None], axis=1)[:, 0]
  v = spec.padded_size

  state = SamplerState(
    step=jnp.zeros((), jnp.int32),
    tokens=jnp.full((b, t_max), spec.pad_id, jnp.int32),
    feed=feed,
    positions=last_pos,
    cache=cache,
    row_keys=row_keys,
    machine=machine,
    logits=jnp.zeros((b, t_max, v), jnp.float32) if return_logits else None,
  )

  # In the "image" and "video" modes every id outside an image run is forced, and inside a run
  # every code is allowed: rows draw from the image codes' logits alone. Without
  # `return_logits` only those logits are computed (a slice of the output table).
  codes_only = spec.mode in ("image", "video")
  codes = (spec.image_offset, spec.image_size)
  logits_slice = codes if codes_only and not return_logits else None

  def body(st: SamplerState) -> SamplerState:
    logits, cache = model.apply(
      variables,
      st.feed[:, None],
      positions=st.positions[:, None],
      cache=st.cache,
      decode=True,
      logits_slice=logits_slice,
    )
    logits = logits[:, 0].astype(jnp.float32)
    m = st.machine
    in_image = m.codes_left > 0
    if use_cfg:
      cond_l, uncond_l = logits[:b], logits[b:]
      guided = uncond_l + cfg_scale * (cond_l - uncond_l)
      logits = jnp.where(in_image[:, None], guided, cond_l)
    forced, klass = cons.forced_and_class(spec, m, t_max - st.step)
    temperature, top_k, top_p = processors.row_settings(sampling, in_image)
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(st.row_keys, st.step)
    if codes_only:
      code_logits = logits if logits_slice else logits[:, codes[0] : codes[0] + codes[1]]
      token = codes[0] + processors.sample(keys, code_logits, temperature, top_k, top_p)
    else:
      allowed = cons.allowed_ids(spec, forced, klass)
      masked = jnp.where(allowed, logits, processors.NEG_INF)
      token = processors.sample(keys, masked, temperature, top_k, top_p)
    token = jnp.where(forced >= 0, forced, token)
    tokens = jax.lax.dynamic_update_slice(st.tokens, token[:, None], (0, st.step))
    out_logits = st.logits
    if return_logits:
      out_logits = jax.lax.dynamic_update_slice(st.logits, logits[:, None], (0, st.step, 0))
    feed = jnp.concatenate([token, token]) if use_cfg else token
    return SamplerState(
      step=st.step + 1,
      tokens=tokens,
      feed=feed,
      positions=st.positions + 1,
      cache=cache,
      row_keys=st.row_keys,
      machine=cons.update(spec, m, token),
      logits=out_logits,
    )

  for i, (end, length) in enumerate(schedule):
    if i:
      state = state.replace(cache=model.grow_cache(state.cache, length))
    cond = lambda st, end=end: (st.step < end) & ~jnp.all(st.machine.done)
    state = jax.lax.while_loop(cond, body, state)
  lengths = jnp.sum(state.tokens != spec.pad_id, axis=1).astype(jnp.int32)
  if spec.mode == cons.FREE:  # <pad> may be drawn there: a row ends at its <eos> only
    is_eos = state.tokens == spec.eos_id
    lengths = jnp.where(jnp.any(is_eos, 1), jnp.argmax(is_eos, 1) + 1, state.step)
  return state.tokens, lengths, state.logits


class Sampler:
  """Samples continuations of prompts with a `vqlm.nn.transformer.Transformer`.

  Args:
    model: the Transformer (its `config.vocab_size` must be `vocab.padded_size`).
    variables: `{"params": ...}` (+ `"codebook"` for codebook-initialised image embeddings).
    vocab: the run's Vocab.
    mesh, rules: optional mesh and logical-axis rules; the call then runs inside them and the
      batch is sharded over the mesh's data x fsdp axes when it divides evenly. A mesh that
      splits only `data` runs one decode loop per device instead (`loop_shards`).
    prompt_bucket: prompt lengths are padded to a multiple of this.
    cache_dtype: KV cache dtype (default: the compute dtype).
    dtype: sample with the weights cast once to this dtype and computed in it (e.g. "bfloat16":
      half the weight and cache memory; on CPU whether it is faster depends on the batch size,
      see docs/benchmarks.md and `python -m vqlm.bench sample --dtype bfloat16`); logits,
      guidance, softmax and sampling stay float32. None: the model's own dtypes.
    cache_block: grow the KV cache this many slots at a time during the decode loop
      (`cache_schedule`): a step attends over the slots reached so far rather than over the
      whole final length, for one compile of the loop body per size (at most
      MAX_CACHE_SEGMENTS). 0: one cache of the final length from the start (one loop body, the
      fastest compile). The samples are the same either way.
  """

  def __init__(
    self,
    model: nn.Module,
    variables: dict[str, Any],
    vocab: Vocab,
    *,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] | None = None,
    prompt_bucket: int = 16,
    cache_dtype: Any = None,
    dtype: Any = None,
    cache_block: int = 64,
  ):
    if model.config.vocab_size != vocab.padded_size:
      raise UserError(
        f"the model's vocab_size={model.config.vocab_size} is not the vocab's "
        f"padded_size={vocab.padded_size}; load the model and vocab of one run."
      )
    if prompt_bucket <= 0:
      raise UserError(f"prompt_bucket={prompt_bucket} must be >= 1.")
    if cache_block < 0:
      raise UserError(f"cache_block={cache_block} must be >= 0 (0: one cache of full length).")
    variables = nn.meta.unbox(variables)
    if dtype is not None:
      dtype = jnp.dtype(dtype)
      model = model.clone(config=model.config.replace(dtype=dtype, param_dtype=dtype))
      cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
      variables = {**variables, "params": jax.tree.map(cast, variables["params"])}
    self._data_only = mesh is not None and mesh.size > 1 and mesh.shape.get("data", 1) == mesh.size
    if self._data_only:  # Replicated once here, not copied to every device at each call.
      variables = jax.device_put(variables, mesh_lib.replicated(mesh))
    self.model = model
    self.variables = variables
    self.vocab = vocab
    self.mesh = mesh
    self.rules = tuple(rules or ())
    self.prompt_bucket = prompt_bucket
    self.cache_dtype = jnp.dtype(cache_dtype or model.config.dtype)
    self.cache_block = cache_block
    self._jitted = {}

  def loop_shards(self, batch: int) -> int:
    """Decode loops a call of `batch` rows runs side by side: the mesh's devices when the mesh
    splits only `data` and `batch` divides over them, else 1 (one loop, partitioned by GSPMD
    on a mesh)."""
    if self._data_only and batch % self.mesh.size == 0:
      return self.mesh.size
    return 1

  def _fn(self, mode: str, max_new_tokens: int, use_cfg: bool, return_logits: bool, shards: int):
    key = (mode, max_new_tokens, use_cfg, return_logits, shards)
    if key not in self._jitted:
      fn = functools.partial(
        _generate,
        model=self.model,
        spec=cons.Spec.from_vocab(self.vocab, mode),
        max_new_tokens=max_new_tokens,
        use_cfg=use_cfg,
        return_logits=return_logits,
        cache_dtype=self.cache_dtype,
        cache_block=self.cache_block,
      )
      if shards > 1:
        rows, everywhere = P("data"), P()
        fn = jax.shard_map(
          fn,
          mesh=self.mesh,
          in_specs=(everywhere, rows, rows, rows, rows, everywhere, everywhere),
          out_specs=(rows, rows, rows if return_logits else everywhere),
          check_vma=False,
        )
      self._jitted[key] = jax.jit(fn)
    return self._jitted[key]

  def _context(self, shards: int = 1):
    if self.mesh is None or shards > 1:  # Per-device loops: no logical constraints inside.
      return contextlib.nullcontext()
    return mesh_lib.activate(self.mesh, self.rules)

  def _put(self, x: np.ndarray) -> jax.Array:
    if self.mesh is None:
      return jnp.asarray(x)
    divisor = self.mesh.shape.get("data", 1) * self.mesh.shape.get("fsdp", 1)
    axes = tuple(a for a in ("data", "fsdp") if a in self.mesh.shape)
    spec = P(axes) if x.ndim and x.shape[0] % divisor == 0 else P()
    return jax.device_put(x, NamedSharding(self.mesh, spec))

  def __call__(
    self,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    mode: str = "interleaved",
    sampling: processors.SamplingConfig | None = None,
    seed: int = 0,
    row_seeds: Sequence[int] | None = None,
    cfg_scale: float | None = None,
    uncond_prompts: Sequence[Sequence[int]] | None = None,
    num_images: int | Sequence[int] = 1,
    batch_size: int | None = None,
    return_logits: bool = False,
  ) -> SampleOutput:
    """Generates up to `max_new_tokens` ids after each prompt.

    Args:
      prompts: B prompts of unified ids (each starting with `<bos>`), any lengths.
      max_new_tokens: static length of the decode loop (a row may stop earlier).
      mode: "text" | "image" | "interleaved" | "video" | "free" (see `vqlm.sample.constraints`).
      sampling: text and image settings (default: temperature 1 for both).
      seed: the base seed; row r uses `row_seeds[r]` (default r) folded into it.
      cfg_scale: classifier-free guidance scale on image codes; None = no guidance (no doubled
        batch). A traced value: changing it does not recompile.
      uncond_prompts: the B unconditional prompts for guidance (default `<bos> <boi>`); they may
        hold `<pad>` (e.g. `pad_uncond_prompts(prompts, vocab)`, Janus's).
      num_images: "image"/"video" modes: images to finish per row (see `initial_state`).
      batch_size: pad the batch to this many rows (inactive) so every call has one shape.
      return_logits: also return the logits after guidance, `[B, T, V]`.
    Returns:
      SampleOutput of the B rows.
    """
    sampling = (sampling or processors.SamplingConfig()).check()
    b = len(prompts)
    if b == 0:
      raise UserError("no prompts given; pass at least one prompt.")
    if max_new_tokens <= 0:
      raise UserError(f"max_new_tokens={max_new_tokens} must be >= 1.")
    full = b if batch_size is None else batch_size
    if full < b:
      raise UserError(f"{b} prompts exceed batch_size={batch_size}; split them into batches.")
    use_cfg = cfg_scale is not None
    prompts = [list(np.asarray(p, np.int64).reshape(-1)) for p in prompts]
    if use_cfg:
      if uncond_prompts is None:
        uncond_prompts = [[self.vocab.bos_id, self.vocab.boi_id]] * b
      uncond_prompts = [list(np.asarray(p, np.int64).reshape(-1)) for p in uncond_prompts]
      if len(uncond_prompts) != b:
        raise UserError(
          f"{len(uncond_prompts)} unconditional prompts for {b} prompts; pass one per prompt."
        )
    pad_rows = full - b
    active = [True] * b + [False] * pad_rows
    rows = prompts + [prompts[0]] * pad_rows
    counts = np.broadcast_to(np.asarray(num_images), (b,))
    counts = np.concatenate([counts, np.ones(pad_rows, counts.dtype)])
    spec = cons.Spec.from_vocab(self.vocab, mode)
    machine = cons.initial_state(spec, rows, num_images=counts, active=active)
    if use_cfg:
      uncond = list(uncond_prompts) + [uncond_prompts[0]] * pad_rows
      # Validates ids; <pad> may mask the caption (Janus's unconditional branch).
      cons.initial_state(spec, uncond, num_images=counts, active=[False] * full, allow_pad=True)
      rows = rows + uncond
    shards = self.loop_shards(full)
    if use_cfg and shards > 1:
      # Each device's loop holds its conditional rows, then their unconditional twins.
      order = np.arange(2 * full).reshape(2, shards, full // shards).transpose(1, 0, 2)
      rows = [rows[i] for i in order.reshape(-1)]
    need = cons.min_new_tokens(spec, machine)
    if max_new_tokens < need:
      raise UserError(
        f"max_new_tokens={max_new_tokens} cannot finish the requested images; use at least {need}."
      )
    lengths = np.asarray([len(p) for p in rows], np.int32)
    s = bucket(int(lengths.max()), self.prompt_bucket)
    tokens = np.full((len(rows), s), self.vocab.pad_id, np.int32)
    for i, p in enumerate(rows):
      tokens[i, : len(p)] = p
    if row_seeds is None:
      row_seeds = range(b)
    row_seeds = np.asarray(list(row_seeds), np.uint32)
    if row_seeds.shape != (b,):
      raise UserError(f"row_seeds has {row_seeds.shape[0]} entries for {b} prompts.")
    row_seeds = np.concatenate([row_seeds, np.zeros(pad_rows, np.uint32)])
    # Threefry whatever the global default: its draws under vmap equal the per-key draws, so a
    # row's sample never depends on its batch neighbours (the "rbg" generators do not promise it).
    base = jax.random.key(seed, impl="threefry2x32")
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, jnp.asarray(row_seeds))
    machine = jax.tree.map(self._put, machine)
    scale = jnp.asarray(1.0 if cfg_scale is None else cfg_scale, jnp.float32)
    fn = self._fn(mode, int(max_new_tokens), use_cfg, return_logits, shards)
    with self._context(shards):
      out_tokens, out_lengths, logits = fn(
        self.variables,
        self._put(tokens),
        self._put(lengths),
        machine,
        keys,
        sampling.as_arrays(),
        scale,
      )
    out_tokens, out_lengths = jax.device_get((out_tokens, out_lengths))
    logits = None if logits is None else np.asarray(jax.device_get(logits))[:b]
    return SampleOutput(
      tokens=np.asarray(out_tokens)[:b], lengths=np.asarray(out_lengths)[:b], logits=logits
    )


@functools.partial(jax.jit, static_argnames=("model",))
def _continuation_logps(model, variables, tokens, starts, lengths):
  """Summed log-probabilities of `tokens[b, starts[b]:lengths[b]]` given what precedes them."""
  logits, _ = model.apply(variables, tokens)
  logps = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logps, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, S - 1]
  position = jnp.arange(1, tokens.shape[1])[None]
  inside = (position >= starts[:, None]) & (position < lengths[:, None])
  return jnp.sum(jnp.where(inside, picked, 0.0), axis=-1)


def continuation_logps(
  sampler: Sampler,
  prompts: Sequence[Sequence[int]],
  continuations: Sequence[Sequence[int]],
  *,
  batch_size: int = 8,
) -> np.ndarray:
  """How likely the model finds each continuation after its prompt (teacher-forced, one forward
  pass per batch): float32 `[N]`, the sum over the continuation's ids of log p(id | the ids
  before it), in float32 whatever the model's dtype. Rows are right-padded to a multiple of
  `sampler.prompt_bucket` and batches to `batch_size` rows, so calls share compiled shapes."""
  if len(prompts) != len(continuations):
    raise UserError(f"{len(prompts)} prompts for {len(continuations)} continuations; pass pairs.")
  if batch_size <= 0:
    raise UserError(f"batch_size={batch_size} must be >= 1.")
  rows = [[int(i) for i in p] + [int(i) for i in c] for p, c in zip(prompts, continuations)]
  if any(len(p) == 0 or len(c) == 0 for p, c in zip(prompts, continuations)):
    raise UserError("every prompt (starting with <bos>) and continuation needs at least one id.")
  if not rows:
    return np.zeros((0,), np.float32)
  width = bucket(max(len(r) for r in rows), sampler.prompt_bucket)
  out = []
  for first in range(0, len(rows), batch_size):
    chunk = rows[first : first + batch_size]
    tokens = np.full((batch_size, width), sampler.vocab.pad_id, np.int32)
    starts = np.zeros(batch_size, np.int32)
    lengths = np.zeros(batch_size, np.int32)
    for i, row in enumerate(chunk):
      tokens[i, : len(row)] = row
      starts[i] = len(prompts[first + i])
      lengths[i] = len(row)
    with sampler._context():
      sums = _continuation_logps(
        sampler.model,
        sampler.variables,
        sampler._put(tokens),
        sampler._put(starts),
        sampler._put(lengths),
      )
    out.append(np.asarray(jax.device_get(sums))[: len(chunk)])
  return np.concatenate(out).astype(np.float32)
