"""Stage 2 from a config: text model + vocabulary, LM examples from code shards, the LM task,
the loop.

`config.data.mixture` weighs the modes (t2i, i2t, document, video, edit); `vqlm.stages.lm_data`
turns it into one source of packed rows, and validation reports each mode's losses.

An LM run directory records everything generation needs: `config.json` (with the tokenizer run's
path and the encoded data directory), `vocab.json` and `text.model` (SentencePiece). With
`config.data.chat.weight > 0` (instruction tuning, `vqlm.stages.chat_data`) chat examples are
mixed into the training data and `chat_data.json` records them.
"""

from collections.abc import Mapping
import functools
import os
import shutil
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqlm import runs
from vqlm.data import pipeline
from vqlm.data.code_shards import read_manifest
from vqlm.errors import UserError
from vqlm.nn.transformer import Transformer
from vqlm.runs import TokenizerRun
from vqlm.runs.lm_run import TEXT_MODEL, VOCAB_FILE, transformer_config
from vqlm.runtime import mesh as mesh_lib
from vqlm.runtime import workdir_lock
from vqlm.runtime.config import as_kwargs
from vqlm.stages import chat_data, init_from, lm_data
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
    texts = lm_data.caption_texts(config, config.data.text_train_examples)
    if not texts:
      raise UserError(
        f"the training split of {config.data.codes} has no captions to train the "
        "text model on; pass --config.data.text_model=PATH"
      )
    if chat:  # The instructions' words too, so that every chat text round-trips.
      texts += chat_data.corpus(chat, config.data.text_train_examples)
    edits = _edit_settings(config)
    if edits:
      texts += edits.module.texts(edits.settings)
    made = train_sentencepiece(
      texts, model_prefix=text_model[: -len(".model")], vocab_size=config.data.text_vocab_size
    )
    what = "texts" if chat or edits else "captions"
    log_fn(f"trained the text model on {len(texts)} {what}: {made}")
  tokenizer = TextTokenizer.load(text_model)
  vocab = Vocab(
    text_size=tokenizer.vocab_size, image_size=codebook_size, grid=grid, text_model=TEXT_MODEL
  )
  if chat:
    vocab = chat_data.with_chat_specials(vocab)
  vocab.save(vocab_path)
  return vocab


class _Edits(NamedTuple):
  module: Any  # vqlm.stages.edit_data
  settings: Any


def _edit_settings(config: ml_collections.ConfigDict) -> _Edits | None:
  """`config.data.edit` checked when the mixture reads edit documents (the module imported only
  then), else None."""
  if lm_data.mixture_weights(config)["edit"] <= 0:
    return None
  from vqlm.stages import edit_data  # pylint: disable=import-outside-toplevel

  settings = edit_data.settings(config)
  return None if settings is None else _Edits(edit_data, settings)


def _prepare_examples(prepare, settings, *, config, vocab, text_model, progress, log_fn):
  """`chat_data.prepare` or `edit_data.prepare` (`prepare`) of `settings` for the run."""
  return prepare(
    settings,
    vocab=vocab,
    text_model=text_model,
    tokenizer_dir=config.data.tokenizer,
    seq_len=config.train.seq_len,
    text_weight=config.loss.text_weight,
    image_weight=config.loss.image_weight,
    progress=progress,
    log_fn=log_fn,
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
  if config.data.get("video_codes"):
    config.data.video_codes = os.path.abspath(config.data.video_codes)
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
  edit_examples: Any = None,
  extra: Mapping[str, list] | None = None,
):
  """Validation perplexity per modality over fixed batches of every active mode (about
  `config.eval.num_batches` in all): the overall metrics (`loss`, `image_loss`, ...) and, with
  several modes, each mode's as `<mode>_loss`, ...; `extra` maps a metric prefix to more fixed
  host-local batches (e.g. "chat_": the chat validation examples)."""
  parts = lm_data.make_parts(
    config,
    "validation",
    vocab=vocab,
    text_model=text_model,
    seed=config.train.seed + 1,
    edit_examples=edit_examples,
  )
  per_mode = max(1, -(-config.eval.num_batches // len(parts)))
  fixed = {}
  for mode, part in parts.items():
    source = part.source
    if len(source) < config.train.batch_size:
      # A small validation split (e.g. 5% of one's own folder) is repeated to fill one batch.
      source = _Repeated(source, config.train.batch_size)
    ds = pipeline.make_dataset(
      source,
      global_batch_size=config.train.batch_size,
      transform=part.transform,
      seed=0,
      shuffle=False,
      num_epochs=1,
    )
    fixed[mode] = [b for _, b in zip(range(per_mode), ds)]
  eval_step = jax.jit(trainer.task.eval_step)

  def add(a, b):
    return b if a is None else {k: a[k] + b[k] for k in a}

  def sums_over(state, batches):
    totals = None
    for batch in batches:
      totals = add(
        totals, jax.device_get(eval_step(state, mesh_lib.global_batch(batch, trainer.mesh)))
      )
    return totals

  def hook(state, step):
    del step
    with trainer.context():
      out, overall = {}, None
      for mode, batches in fixed.items():
        sums = sums_over(state, batches)
        overall = add(overall, sums)
        if len(fixed) > 1:
          out.update({f"{mode}_{k}": v for k, v in eval_summary(sums).items()})
      out.update(eval_summary(overall))
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
  lm_data.check_data(config)
  chat = chat_data.settings(config)
  runs.check_same_model(workdir, config, sections=("model",))
  vocab = prepare_vocab(config, workdir, log_fn=log_fn, share_files=share_files)
  text_model = os.path.join(workdir, TEXT_MODEL)
  lm_data.check_seq_len(config, vocab, text_model)
  examples = functools.partial(
    _prepare_examples,
    config=config,
    vocab=vocab,
    text_model=text_model,
    progress=progress,
    log_fn=log_fn,
  )
  chat_examples = examples(chat_data.prepare, chat) if chat else None
  edits = _edit_settings(config)
  edit_examples = examples(edits.module.prepare, edits.settings) if edits else None
  runs.save_config(workdir, config)
  trainer = build_trainer(config, vocab, progress=progress)
  source, transform = lm_data.make_source(
    config,
    "train",
    vocab=vocab,
    text_model=text_model,
    seed=config.train.seed,
    edit_examples=edit_examples.train if edit_examples else None,
  )
  if edit_examples is not None and jax.process_index() == 0:
    edits.module.write_info(workdir, edit_examples.info)
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
      fn=make_eval_hook(
        trainer,
        config,
        vocab,
        text_model,
        edit_examples=edit_examples.validation if edit_examples else None,
        extra=extra,
      ),
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
