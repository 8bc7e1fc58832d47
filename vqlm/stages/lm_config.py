"""Transformer LM configs (stage 2: interleaved text/image sequences).

`vqlm train --config configs/lm.py:size=small --workdir RUN`

Arguments (`key=value,...`):
  size      tiny (tests, seconds) | small (the CPU demo, ~3.5M params) | base (~110M) |
            large (~340M) | xl (~1.3B) | 7b (Chameleon-7B shaped, ~7.0B)
  dtype     compute dtype: float32 | bfloat16 (default: float32 up to small, bfloat16 above)
  remat     none | full | dots | dots_with_no_batch_dims (default: per size)
  runlocal  shrink logging/checkpoint intervals for a quick local run

`config.model` holds the Transformer kwargs except those that come from the run's Vocab and image
tokenizer at run time: vocab_size, image_offset, image_size, grid and codebook_dim (the width of
the tokenizer's codebook, `config.data.codebook_dim`, used with image_embed_init="codebook").
With image_embed_init="levels" (FSQ tokenizers: each code's row is a sum of per-channel level
embeddings), an empty `model.code_levels` is filled from the tokenizer run. The parameter counts
above assume the vocabulary sizes of `NOMINAL_VOCAB` (`vqlm.nn.transformer.count_params`).
"""

import ml_collections

from vqlm.nn.presets import NOMINAL_VOCAB, TRANSFORMER_SIZES  # noqa: F401 (re-exported)
from vqlm.runtime.config import choose, mesh_config, parse_arg

_SMALL_MODELS = ("tiny", "small")

# How each size is trained and run (its shape is `vqlm.nn.presets.TRANSFORMER_SIZES`).
RECIPES = {
  "tiny": dict(
    lr=3e-3, steps=20, batch_size=4, seq_len=96, scan_layers=False, remat_policy="none", mesh=dict()
  ),
  # 2 query chunks: faster than 8 on CPU at this shape (docs/benchmarks.md).
  "small": dict(
    lr=2e-3,
    steps=4000,
    batch_size=32,
    seq_len=96,
    scan_layers=False,
    remat_policy="none",
    mesh=dict(),
    query_chunks=2,
  ),
  # Unrolled: data-parallel by default, so scanning buys only compile time and costs step time
  # on CPU (docs/benchmarks.md).
  "base": dict(
    lr=6e-4,
    steps=200_000,
    batch_size=256,
    seq_len=2048,
    scan_layers=False,
    remat_policy="dots_with_no_batch_dims",
    mesh=dict(),
  ),
  "large": dict(
    lr=3e-4,
    steps=300_000,
    batch_size=512,
    seq_len=2048,
    scan_layers=True,
    remat_policy="dots_with_no_batch_dims",
    mesh=dict(data=-1, fsdp=1),
  ),
  "xl": dict(
    lr=2e-4,
    steps=400_000,
    batch_size=1024,
    seq_len=2048,
    scan_layers=True,
    remat_policy="dots_with_no_batch_dims",
    mesh=dict(data=1, fsdp=-1),
  ),
  "7b": dict(
    lr=1e-4,
    steps=500_000,
    batch_size=1024,
    seq_len=4096,
    scan_layers=True,
    remat_policy="full",
    mesh=dict(data=1, fsdp=-1),
  ),
}
SIZES = tuple(RECIPES)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, size="small", dtype="", remat="", runlocal=False)
  s = {**choose("size", arg.size, RECIPES), **TRANSFORMER_SIZES[arg.size]}
  small = arg.size in _SMALL_MODELS
  dtype = arg.dtype or ("float32" if small else "bfloat16")
  choose("dtype", dtype, {"float32": 0, "bfloat16": 0})
  remat = arg.remat or s["remat_policy"]
  choose("remat", remat, {"none": 0, "full": 0, "dots": 0, "dots_with_no_batch_dims": 0})

  c = ml_collections.ConfigDict()
  c.stage = "lm"
  c.size = arg.size
  # Start from another LM run's parameters (not its optimizer state or step): a path to the run.
  # Its vocabulary and model shapes must match (its text model is reused when data.text_model is
  # empty). Used only when this run has no checkpoint yet; a run resumes from its own.
  c.init_from = ""

  # Data: code shards written by `vqlm encode` (the tokenizer run is read from their manifest when
  # `tokenizer` is empty); the SentencePiece model is trained on their captions unless given.
  # mixture: "mode=weight,...", the share of training rows of each mode (`vqlm.stages.lm_data`):
  # t2i, i2t (a record of `codes` each), document (`pairs_per_document` consecutive records),
  # video (a clip of `video_codes`: codes [frames, h, w], e.g. `vqlm encode --data
  # moving_shapes`), edit (image-edit documents about shapes scenes, built from `edit`). Each row
  # holds examples of one mode, packed as many as fit in train.seq_len.
  c.data = dict(
    codes="",
    video_codes="",
    tokenizer="",
    text_model="",
    text_vocab_size=512 if small else 32000,
    text_train_examples=100_000,
    mixture="t2i=0.5,i2t=0.5",
    caption_dropout=0.1,
    # Clips whose caption is dropped (video mode): they teach continuing a clip from its frames
    # alone; with the caption the frames follow from it.
    video_caption_dropout=0.5,
    # Caption ids a clip keeps (video mode); 0: max_text_len. Clip captions also tell the motion
    # ("... moves right from the top left to the top right"), so they may need more than images'.
    video_max_text_len=0,
    mask_prompt=False,
    # t2i rows list a shapes caption's objects in a random order (the prompt a user writes need
    # not follow the data set's canonical order); captions the LM writes (i2t) stay canonical.
    shuffle_objects=False,
    # The share of t2i prompts (shapes captions) reworded as a request names the scene: objects
    # in a random order, size and position synonyms ("a big red circle in the upper left and a
    # little blue square in the middle"); `vqlm.data.chat.reworded`.
    reword_prompts=0.0,
    max_text_len=29 if small else 128,
    frames=1,
    pairs_per_document=2,
    # Image-edit documents (`vqlm.stages.edit_data`), read when the mixture gives edit a weight:
    # <bos> instruction <boi> source <eoi> <boi> result <eoi> ... <eos> (loss after the source).
    edit=dict(
      # Training documents (split "train") and validation documents (split "validation"),
      # built and encoded once before training.
      num_examples=20_000,
      validation_examples=256,
      # Edits per document: 1 .. max_edits (a story of several edits in a row).
      max_edits=1,
      # Comma-separated subset of move,recolor,add,remove.
      kinds="move,recolor,add,remove",
      # Objects in the source scene.
      min_objects=1,
      max_objects=2,
      seed=0,
      # Say each edit in words before its result: "<caption of the source> so <caption of the
      # result>" (`vqlm.data.edits.reason`); the edit evaluator then lets the model write it.
      reason=False,
      # What the reason says: "scene" (both scenes' captions), "change" (only the object the
      # edit changes, before and after: "a small red circle on the left so nothing") or
      # "caption_change" (the source's caption, then the change) or "focus_change" (the
      # source's caption, the instruction's name of the object, then the change).
      reason_style="scene",
    ),
    codebook_dim=0,
    num_threads=2,
    # Instruction tuning (SFT, `vqlm.stages.chat_data`): shapes instructions (draw requests,
    # questions about an image, descriptions; `vqlm.data.chat.conversation`) mixed into the data.
    chat=dict(
      # Fraction of training examples that are chat examples, in [0, 1); 0 is off (the vocab,
      # data and batches are then exactly those of a run without chat). > 0 adds <user> and
      # <assistant> to the vocab (a run started without them cannot add them: use init_from).
      weight=0.0,
      # Training instructions (split "train"), built and encoded once before training.
      num_examples=20_000,
      # Validation instructions (split "validation": other scenes); their loss on the assistant
      # tokens is logged as valid/chat_loss, valid/chat_text_loss, valid/chat_image_loss.
      validation_examples=256,
      # Comma-separated subset of draw,question,describe; a kind named twice is drawn twice as
      # often ("draw,question,question,describe": half of the instructions are questions).
      kinds="draw,question,describe",
      # Objects per scene (1..9 cells of the 3x3 grid).
      min_objects=1,
      max_objects=3,
      # Draw replies restate the request as the scene's caption (objects in cell order, the
      # captions' words) before the image: the model rewrites a free-form request into the
      # caption form it draws best, then draws (`vqlm.sample.chat.draw(restate=True)`).
      restate=False,
      # Question replies describe the image (its caption) before the answer ("a large red circle
      # at the top left so red"): the model reads the scene in the form it captions best, then
      # answers from that text (`vqlm.data.chat.reasoned`).
      reason=False,
      # With reason: the reply names what the question asks about, in the captions' words,
      # between the description and the answer ("... so color at the top left so red"): the
      # answer is read from the words just before it (`vqlm.data.chat.question`'s focus).
      focus=False,
      # With focus: what the reply names, "question" (as above) or "object": the caption phrase
      # of the object a colour, shape, size or position question asks about ("... so a large red
      # circle at the top left so red"; counts keep the question's focus).
      focus_style="question",
      # Fraction of draw instructions whose request is dropped (an empty user turn): the model
      # learns to draw with no request, and chat drawing is guided against that empty request
      # (`<bos> <user> <assistant> <boi>`) instead of the captions' `<bos> <boi>`.
      drop_request=0.0,
      # Seed of the instructions (`chat.conversation(i, seed=...)`) and of the mixture's order.
      seed=0,
    ),
  )

  c.model = dict(
    dim=s["dim"],
    num_layers=s["num_layers"],
    num_heads=s["num_heads"],
    num_kv_heads=s["num_kv_heads"],
    head_dim=0,  # 0: dim // num_heads
    mlp_dim=s["mlp_dim"],
    qk_norm=s["qk_norm"],
    tie_embeddings=s["tie_embeddings"],
    rope_theta=10_000.0,
    rope_2d=False,
    image_pos_embed=False,
    image_embed_init="learned",
    code_levels=(),
    scan_layers=s["scan_layers"],
    remat_policy=remat,
    norm_eps=1e-6,
    dtype=dtype,
    param_dtype="float32",
    attention_impl="auto",  # cudnn on a CUDA GPU (bf16), splash on TPU, else xla.
    query_chunks=s.get("query_chunks", 8),
  )

  c.optim = dict(
    learning_rate=s["lr"],
    warmup_steps=min(2000, max(1, s["steps"] // 10)),
    end_lr_fraction=0.1,
    weight_decay=0.1,
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    clip_norm=1.0,
    grad_accum_steps=1,
    # Regular expressions over parameter paths (`embed`, `blocks_0/attn`, ...); matching
    # parameters are not trained (e.g. with init_from).
    freeze=(),
  )

  # text_weight / image_weight scale the loss weights of text / image targets when the data
  # pipeline builds examples; z_loss is LMTask's z_loss_weight.
  c.loss = dict(z_loss=1e-4, text_weight=1.0, image_weight=1.0)

  c.train = dict(
    steps=s["steps"],
    batch_size=s["batch_size"],
    seq_len=s["seq_len"],
    seed=0,
    log_every=50,
    eval_every=1000,
    checkpoint_every=1000,
    checkpoint_minutes=10.0,
    keep_checkpoints=3,
    # Steps divisible by this are permanent checkpoints, never deleted (0: none).
    keep_every_steps=0,
    # How a checkpoint commits: auto (commit_file on FUSE mounts and gs://, else rename),
    # rename, or commit_file.
    checkpoint_commit="auto",
    max_consecutive_skips=10,
    # > 0: skip an update whose loss exceeds the running mean + spike_sigma * std (an EMA),
    # after spike_warmup applied updates; 0: only non-finite updates are skipped.
    spike_sigma=0.0,
    spike_warmup=100,
  )
  c.eval = dict(num_batches=10)
  # Evaluators run after training (and by `vqlm eval`): `{section: {"type": ..., settings}}`
  # (`vqlm.eval.evaluators`); those that judge images need the shapes data set.
  c.evals = {}
  if arg.size == "tiny" or arg.runlocal:
    c.train.update(log_every=5, eval_every=10, checkpoint_every=10)
    c.eval.update(num_batches=2)

  c.mesh = mesh_config(**s["mesh"])
  c.lock()
  return c
