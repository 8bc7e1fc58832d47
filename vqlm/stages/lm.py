"""Stage 2 from a config: text model + vocabulary, LM examples from code shards, the LM task,
the loop.

`config.data.mode` picks the layout (`vqlm.data.sequences`): one shard record per example in
t2i / i2t / mix, clips of codes `[frames, h, w]` in video, and in document mode one document of
`config.data.pairs_per_document` consecutive records (`make_source`: a `GroupedSource`).

An LM run directory records everything generation needs: `config.json` (with the tokenizer run's
path and the encoded data directory), `vocab.json` and `text.model` (SentencePiece). With
`config.data.chat.weight > 0` (instruction tuning, `vqlm.stages.chat_data`) chat examples are
mixed into the training data and `chat_data.json` records them.
"""

from collections.abc import Mapping
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqlm import runs
from vqlm.data import pipeline
from vqlm.data.code_shards import CodeShards, read_manifest
from vqlm.data.sequences import GroupedSource, SequenceBuilder, needed_seq_len
from vqlm.errors import UserError
from vqlm.nn.transformer import Transformer
from vqlm.runs import TokenizerRun
from vqlm.runs.lm_run import TEXT_MODEL, VOCAB_FILE, transformer_config
from vqlm.runtime import mesh as mesh_lib
from vqlm.runtime import workdir_lock
from vqlm.runtime.config import as_kwargs
from vqlm.stages import chat_data, init_from
from vqlm.stages.wiring import make_trainer
from vqlm.text import TextTokenizer, train_sentencepiece
from vqlm.train import loop
from vqlm.train.lm_task import LMTask, eval_summary
from vqlm.train.optim import make_optimizer
from vqlm.vocab import Vocab


def prepare_vocab(
  config: ml_collections.ConfigDict, workdir: str, *, log_fn=print, share_files=None
) -> Vocab:
  """Trains (or copies) the SentencePiece model into the run and writes `vocab.json`.

  An existing `vocab.json` is kept, after checking that it matches the encoded data. With several
  processes, process 0 writes the files and the others wait for it, then read them. Where each
  process has its own copy of the run directory (a bucket work directory), every process calls
  `share_files(writer)` around the wait: process 0 (`writer=True`) publishes, the others fetch.
  """
  if jax.process_count() == 1:
    return _prepare_vocab(config, workdir, log_fn=log_fn)
  from jax.experimental import multihost_utils

  writer = jax.process_index() == 0
  if writer:
    _prepare_vocab(config, workdir, log_fn=log_fn)
    if share_files is not None:
      share_files(True)
  multihost_utils.sync_global_devices("vqlm_prepare_vocab")
  if share_files is not None and not writer:
    share_files(False)
  return _prepare_vocab(config, workdir, log_fn=log_fn)


def _prepare_vocab(config: ml_collections.ConfigDict, workdir: str, *, log_fn=print) -> Vocab:
  manifest = read_manifest(config.data.codes)
  grid, codebook_size = tuple(manifest["grid"]), int(manifest["codebook_size"])
  vocab_path = os.path.join(workdir, VOCAB_FILE)
  chat = chat_data.settings(config)
  if os.path.exists(vocab_path):
    vocab = Vocab.load(vocab_path)
    if tuple(vocab.grid) != grid or vocab.image_size != codebook_size:
      raise UserError(
        f"{vocab_path} was made for a {vocab.grid} grid of {vocab.image_size} codes but "
        f"{config.data.codes} holds a {grid} grid of {codebook_size} codes; use a new --workdir"
      )
    return chat_data.with_chat_specials(vocab, existing=vocab_path) if chat else vocab
  text_model = os.path.join(workdir, TEXT_MODEL)
  if config.data.text_model:
    shutil.copyfile(config.data.text_model, text_model)
  else:
    shards = CodeShards(config.data.codes, "train")
    n = min(len(shards), config.data.text_train_examples)
    texts = [shards[i]["text"] for i in range(n)]
    texts = [t for t in texts if t.strip()]
    if not texts:
      raise UserError(
        f"the training split of {config.data.codes} has no captions to train the "
        "text model on; pass --config.data.text_model=PATH"
      )
    if chat:  # The instructions' words too, so that every chat text round-trips.
      texts += chat_data.corpus(chat, config.data.text_train_examples)
    made = train_sentencepiece(
      texts, model_prefix=text_model[: -len(".model")], vocab_size=config.data.text_vocab_size
    )
    log_fn(f"trained the text model on {len(texts)} {'texts' if chat else 'captions'}: {made}")
  tokenizer = TextTokenizer.load(text_model)
  vocab = Vocab(
    text_size=tokenizer.vocab_size, image_size=codebook_size, grid=grid, text_model=TEXT_MODEL
  )
  if chat:
    vocab = chat_data.with_chat_specials(vocab)
  vocab.save(vocab_path)
  return vocab


def make_source(config: ml_collections.ConfigDict, split: str):
  """The split's random-access elements for `config.data.mode`: shard records, or in document
  mode groups of `pairs_per_document` consecutive records (the tail that fills no group is
  dropped)."""
  shards = CodeShards(config.data.codes, split)
  if config.data.mode != "document":
    return shards
  k = _pairs_per_document(config)
  if len(shards) < k:
    raise UserError(
      f"the '{split}' split of {config.data.codes} has {len(shards)} records, fewer than one "
      f"document of config.data.pairs_per_document={k}; lower --config.data.pairs_per_document"
    )
  return GroupedSource(shards, k)


def _pairs_per_document(config: ml_collections.ConfigDict) -> int:
  k = int(config.data.get("pairs_per_document", 2))
  if k < 1:
    raise UserError(
      f"config.data.pairs_per_document={k} must be >= 1; e.g. --config.data.pairs_per_document=2"
    )
  return k


class ExampleTransform:
  """(index, element) -> padded LM example: captions encoded, then the sequence layout. An
  element is a shard record, or in document mode a list of them (see `make_source`)."""

  def __init__(self, *, text_model: str, builder: SequenceBuilder, max_text_len: int):
    self.text_model = text_model
    self.builder = builder
    self.max_text_len = max_text_len
    self._tokenizer = None

  def __call__(self, index: int, element: dict | list[dict]) -> dict[str, np.ndarray]:
    if self._tokenizer is None:
      self._tokenizer = TextTokenizer.load(self.text_model)
    if isinstance(element, Mapping):
      return self.builder(self._record(element), index)
    return self.builder([self._record(r) for r in element], index)

  def _record(self, record: Mapping[str, Any]) -> dict[str, Any]:
    # Captions beyond max_text_len are cut (checked up front on the training split, so this
    # only guards against rare outliers; an over-long example must never stop an epoch).
    text_ids = self.builder.vocab.encode_text(self._tokenizer, record["text"])[: self.max_text_len]
    return {"text_ids": text_ids, "codes": record["codes"]}


def make_builder(config: ml_collections.ConfigDict, vocab: Vocab, *, seed: int) -> SequenceBuilder:
  d = config.data
  return SequenceBuilder(
    vocab=vocab,
    mode=d.mode,
    seq_len=config.train.seq_len,
    t2i_ratio=d.t2i_ratio,
    caption_dropout=d.caption_dropout,
    text_weight=config.loss.text_weight,
    image_weight=config.loss.image_weight,
    mask_prompt=d.mask_prompt,
    seed=seed,
  )


def check_data(config: ml_collections.ConfigDict) -> None:
  """Fails early if the first training record does not suit `config.data.mode`: images `[h, w]`
  for t2i / i2t / mix / document, clips `[frames, h, w]` for video."""
  d = config.data
  if d.mode == "document":
    _pairs_per_document(config)
  shards = CodeShards(d.codes, "train")
  if not len(shards):
    return
  shape = tuple(np.shape(shards[0]["codes"]))
  if d.mode == "video":
    if len(shape) != 3:
      raise UserError(
        f"mode='video' needs clips of codes [frames, h, w] but {d.codes} holds images of codes "
        f"{list(shape)}; encode a video source (`vqlm encode --data moving_shapes`) or set "
        "--config.data.mode=mix"
      )
    frames = d.get("frames", 1)
    if shape[0] != frames:
      raise UserError(
        f"the clips in {d.codes} have {shape[0]} frames but config.data.frames={frames}; "
        f"set --config.data.frames={shape[0]}"
      )
  elif len(shape) != 2:
    raise UserError(
      f"{d.codes} holds video clips of codes {list(shape)} but config.data.mode={d.mode!r}; set "
      f"--config.data.mode=video --config.data.frames={shape[0]}"
    )


def check_seq_len(config: ml_collections.ConfigDict, vocab: Vocab, text_model: str) -> None:
  """Fails early if the captions (first 2000 training ones) or the sequences of
  `config.data.mode` (pairs per document, frames per clip) do not fit train.seq_len."""
  tokenizer = TextTokenizer.load(text_model)
  shards = CodeShards(config.data.codes, "train")
  longest = max(
    (len(tokenizer.encode(shards[i]["text"])) for i in range(min(2000, len(shards)))), default=0
  )
  if longest > config.data.max_text_len:
    raise UserError(
      f"captions of up to {longest} text ids exceed data.max_text_len="
      f"{config.data.max_text_len}; set --config.data.max_text_len={longest}"
    )
  mode = config.data.mode
  frames = int(config.data.get("frames", 1)) if mode == "video" else 1
  pairs = _pairs_per_document(config) if mode == "document" else 1
  need = needed_seq_len(
    vocab, max_text_len=config.data.max_text_len, mode=mode, frames=frames, pairs=pairs
  )
  if need > config.train.seq_len:
    per = f"{pairs} x (" if pairs > 1 else ""
    images = f"{frames} x " if frames > 1 else ""
    raise UserError(
      f"mode={mode!r} sequences need {need} tokens ({per}captions up to "
      f"{config.data.max_text_len} ids + {images}{vocab.tokens_per_image} image codes"
      f"{')' if per else ''} + specials) but train.seq_len is {config.train.seq_len}; set "
      f"--config.train.seq_len={need}"
    )


def build_trainer(
  config: ml_collections.ConfigDict, vocab: Vocab, *, progress: bool = True
) -> loop.Trainer:
  model = Transformer(transformer_config(config, vocab))
  optimizer, _ = make_optimizer(total_steps=config.train.steps, **as_kwargs(config.optim))
  codebook = None
  if config.model.image_embed_init == "codebook":
    codebook = jnp.asarray(TokenizerRun(config.data.tokenizer).codebook())
  task = LMTask(
    model=model,
    optimizer=optimizer,
    z_loss_weight=config.loss.z_loss,
    image_offset=vocab.image_offset,
    image_size=vocab.image_size,
    codebook=codebook,
  )
  return make_trainer(task, config, progress=progress, throughput_key="num_tokens")


def example_batch(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  b, s = config.train.batch_size, config.train.seq_len
  zeros = np.zeros((b, s), np.int32)
  return {
    "tokens": zeros,
    "targets": zeros,
    "segment_ids": np.ones((b, s), np.int32),
    "positions": np.tile(np.arange(s, dtype=np.int32), (b, 1)),
    "loss_weights": np.ones((b, s), np.float32),
  }


def _resolve_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Absolute data paths, the tokenizer run taken from the code shards' manifest if unset, and
  the tokenizer's FSQ levels when the LM embeds image codes by level."""
  if not config.data.codes:
    raise UserError(
      "config.data.codes is empty: pass --config.data.codes=DIR made by `vqlm encode`"
    )
  config.data.codes = os.path.abspath(config.data.codes)
  manifest = read_manifest(config.data.codes)
  if not config.data.tokenizer:
    config.data.tokenizer = manifest["tokenizer_run"]
  config.data.tokenizer = os.path.abspath(config.data.tokenizer)
  if config.get("init_from"):
    config.init_from = init_from.check_source(config.init_from)
    if not config.data.text_model:  # The source run's token ids for text.
      config.data.text_model = os.path.join(config.init_from, TEXT_MODEL)
  if config.model.get("image_embed_init") == "levels":
    config.model.code_levels = tokenizer_levels(
      config.data.tokenizer, tuple(config.model.get("code_levels", ()))
    )
  return config


def tokenizer_levels(tokenizer_dir: str, given: tuple[int, ...] = ()) -> tuple[int, ...]:
  """The FSQ levels of the image tokenizer run in `tokenizer_dir` (for image_embed_init="levels");
  `given` levels must match them."""
  bottleneck = runs.load_config(tokenizer_dir).model.bottleneck
  if bottleneck.get("kind") != "fsq":
    raise UserError(
      f"image_embed_init='levels' needs an FSQ image tokenizer, but {tokenizer_dir} "
      f"uses '{bottleneck.get('kind')}'; use image_embed_init='learned' or train "
      "the tokenizer with bottleneck=fsq"
    )
  levels = tuple(int(l) for l in bottleneck.levels)
  if given and tuple(int(l) for l in given) != levels:
    raise UserError(
      f"config.model.code_levels={tuple(given)} but the tokenizer {tokenizer_dir} "
      f"has FSQ levels {levels}; leave code_levels empty to take the tokenizer's"
    )
  return levels


class _Repeated:
  """`source` repeated until it holds at least `size` elements (in order)."""

  def __init__(self, source, size: int):
    if not len(source):
      raise UserError(
        "the validation split is empty; encode it with `vqlm encode --splits train,validation`"
      )
    self.source, self.size = source, max(size, len(source))

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int):
    return self.source[index % len(self.source)]


def make_eval_hook(
  trainer: loop.Trainer,
  config,
  vocab: Vocab,
  text_model: str,
  *,
  extra: Mapping[str, list] | None = None,
):
  """Validation perplexity per modality over `config.eval.num_batches` fixed batches; `extra`
  maps a metric prefix to more fixed host-local batches (e.g. "chat_": the chat validation
  examples)."""
  source = make_source(config, "validation")
  if len(source) < config.train.batch_size:
    # A small validation split (e.g. 5% of one's own folder) is repeated to fill one batch.
    source = _Repeated(source, config.train.batch_size)
  builder = make_builder(config, vocab, seed=config.train.seed + 1)
  transform = ExampleTransform(
    text_model=text_model, builder=builder, max_text_len=config.data.max_text_len
  )
  ds = pipeline.make_dataset(
    source,
    global_batch_size=config.train.batch_size,
    transform=transform,
    seed=0,
    shuffle=False,
    num_epochs=1,
  )
  batches = [b for _, b in zip(range(config.eval.num_batches), ds)]
  eval_step = jax.jit(trainer.task.eval_step)

  def sums_over(state, fixed):
    totals = None
    for batch in fixed:
      sums = jax.device_get(eval_step(state, mesh_lib.global_batch(batch, trainer.mesh)))
      totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
    return totals

  def hook(state, step):
    del step
    with trainer.context():
      out = eval_summary(sums_over(state, batches))
      for prefix, more in (extra or {}).items():
        out.update({prefix + k: v for k, v in eval_summary(sums_over(state, more)).items()})
    return out

  return hook


def train(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  progress: bool = True,
  log_fn=print,
  extra_hooks=(),
  checkpoint_dir: str | None = None,
  after_save=None,
  share_files=None,
) -> Any:
  """Trains the LM on pre-encoded data (`config.data.codes`).

  `checkpoint_dir` and `after_save` are `loop.run`'s; `share_files` is `prepare_vocab`'s.
  Refused (UserError) while another run trains in `workdir`."""
  loop_kwargs = dict(checkpoint_dir=checkpoint_dir, after_save=after_save)
  with workdir_lock.hold(workdir):
    return _train(
      config,
      workdir,
      progress=progress,
      log_fn=log_fn,
      extra_hooks=extra_hooks,
      loop_kwargs=loop_kwargs,
      share_files=share_files,
    )


def _train(config, workdir, *, progress, log_fn, extra_hooks, loop_kwargs, share_files) -> Any:
  config = _resolve_paths(config)
  check_data(config)
  chat = chat_data.settings(config)
  runs.check_same_model(workdir, config, sections=("model",))
  vocab = prepare_vocab(config, workdir, log_fn=log_fn, share_files=share_files)
  text_model = os.path.join(workdir, TEXT_MODEL)
  check_seq_len(config, vocab, text_model)
  chat_examples = None
  if chat:
    chat_examples = chat_data.prepare(
      chat,
      vocab=vocab,
      text_model=text_model,
      tokenizer_dir=config.data.tokenizer,
      seq_len=config.train.seq_len,
      text_weight=config.loss.text_weight,
      image_weight=config.loss.image_weight,
      progress=progress,
      log_fn=log_fn,
    )
  runs.save_config(workdir, config)
  trainer = build_trainer(config, vocab, progress=progress)
  source = make_source(config, "train")
  transform = ExampleTransform(
    text_model=text_model,
    builder=make_builder(config, vocab, seed=config.train.seed),
    max_text_len=config.data.max_text_len,
  )
  extra = {}
  if chat_examples is not None:
    source, transform = chat_data.mixture(
      source, transform, chat_examples.train, weight=chat.weight, seed=chat.seed
    )
    chat_data.write_info(workdir, chat_examples.info, source)
    extra["chat_"] = chat_examples.validation.batches(
      config.train.batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
  data_iter = pipeline.make_iterator(
    source,
    global_batch_size=config.train.batch_size,
    transform=transform,
    seed=config.train.seed,
    num_threads=config.data.num_threads,
  )
  hooks = [
    loop.Hook(
      every=config.train.eval_every,
      fn=make_eval_hook(trainer, config, vocab, text_model, extra=extra),
      name="valid",
    )
  ]
  hooks += list(extra_hooks)
  result = loop.run(
    trainer,
    data_iter=data_iter,
    workdir=workdir,
    hooks=hooks,
    meta={"stage": "lm"},
    log_fn=log_fn,
    warm_start=init_from.warm_start(config.get("init_from"), vocab, text_model, log_fn=log_fn),
    **loop_kwargs,
  )
  if config.get("evals"):
    run_evals(config, workdir, log_fn=log_fn)
  return result


def run_evals(config: ml_collections.ConfigDict, workdir: str, *, log_fn=print) -> dict:
  """Runs `config.evals` on the trained LM (parameters only) and writes RUN/eval.json."""
  from vqlm.eval import evaluators as evaluators_lib
  from vqlm.runs import LMRun

  evaluators = evaluators_lib.build(as_kwargs(config.evals), log_fn=log_fn)
  return evaluators_lib.run_all(
    LMRun(workdir),
    evaluators,
    workdir=workdir if jax.process_index() == 0 else None,
    log_fn=log_fn,
  )
