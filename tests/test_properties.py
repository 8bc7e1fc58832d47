"""Property-based tests (hypothesis) of bad input: whatever a user passes, vqlm either works or
says what is wrong in one line (a user error, `cli.USER_ERRORS`: what the `vqlm` command prints
as `vqlm: error: ...`), never another exception.

Properties: config overrides applied as the command line applies them, then the stage built
abstractly; folders of good and damaged images; caption files; prompts to generate on the tiny
run; `vqlm caption --image` with files that are not images. Examples are few (`max_examples`)
and built in temporary folders inside each test (hypothesis runs one test function many times,
so function-scoped fixtures would be shared between examples).
"""

import contextlib
import csv
import io
import json
import os
import struct
import tempfile
import warnings
import zlib

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

import vqlm
from vqlm import cli
from vqlm.commands import compile as compile_cmd
from vqlm.commands import flags as flag_lib
from vqlm.data import sources
from vqlm.nn.image_tokenizer import ImageTokenizer
from vqlm.runtime.config import as_kwargs
from vqlm.stages import lm_config, tokenizer_config

USER_ERRORS = cli.USER_ERRORS


def _check_one_line(error: BaseException) -> None:
  message = str(error).strip()
  assert message and "\n" not in message, repr(message)


# ------------------------------------------------------------------------------ config overrides

CONFIGS = {
  "configs/lm.py:size=tiny": lm_config.get_config("size=tiny"),
  "configs/tokenizer.py:size=tiny": tokenizer_config.get_config("size=tiny"),
}


def _fields(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every field path of `config`, sections included (`model`, `model.dim`, ...)."""
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      out += _fields(value, f"{prefix}{key}.")
  return out


def _lookup(config: ml_collections.ConfigDict, path: str):
  for part in path.split("."):
    if not isinstance(config, ml_collections.ConfigDict) or part not in config:
      return None
    config = config[part]
  return config


# `stage` is left out: it picks the code that reads the rest of the config (`--config.stage=lm`
# on a tokenizer config fails on the first field the LM stage misses, an AttributeError).
# Whole sections last: hypothesis draws the first entries most often.
FIELDS = {
  spec: sorted(
    (f for f in _fields(c) if f != "stage"),
    key=lambda f: (isinstance(_lookup(c, f), ml_collections.ConfigDict), f),
  )
  for spec, c in CONFIGS.items()
}
_NAMES = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True)
# Sizes beyond int32 must be refused; sizes a little above the presets (a few thousand layers)
# are valid models whose (unrolled) tracing would only be slow, so positive ints stay small.
_INTS = st.one_of(
  st.integers(-10, 64), st.integers(min_value=2**31, max_value=2**80), st.integers(max_value=-1)
)
_WORDS = ["", "none", "float32", "bfloat16", "int8", "vq", "fsq", "gaussian", "identity", "conv"]
_WORDS += ["patch", "full", "dots", "learned", "codebook", "levels", "mix", "document", "video"]
_VALUES = st.one_of(
  _INTS,
  st.floats(),  # nan, inf, huge, tiny, negative
  st.booleans(),
  st.sampled_from(
    ["None", "()", "(1, 2)", "(0, 0)", "(-1,)", "[1", "[]", "{}", "{'a': 1}", "''", "1e308"]
    + ["inf", "nan", "1e-30", "x" * 300]
  ),
  st.text(max_size=20),
)
# Values of the type a field holds (they pass the command line's type check and reach the code).
_TYPED = {
  bool: st.booleans(),
  int: _INTS,
  float: st.floats(),
  str: st.one_of(st.sampled_from(_WORDS), st.text(max_size=20)),
  tuple: st.lists(st.integers(-3, 12), max_size=4).map(lambda t: str(tuple(t))),
}


@st.composite
def config_overrides(draw):
  """(config spec, [(field path, value)]): existing fields (most often), unknown top-level and
  nested ones; values of any type, half the time of the field's own type."""
  spec = draw(st.sampled_from(sorted(CONFIGS)))
  overrides = []
  for _ in range(draw(st.integers(1, 3))):
    kind = draw(st.sampled_from(["field"] * 8 + ["nested", "top"]))
    key = draw(st.sampled_from(FIELDS[spec]))
    if kind != "field":
      key = f"{key}.{draw(_NAMES)}" if kind == "nested" else draw(_NAMES)
    typed = _TYPED.get(type(_lookup(CONFIGS[spec], key)))
    overrides.append((key, draw(typed if typed is not None and draw(st.booleans()) else _VALUES)))
  return spec, overrides


def _build_abstract(config: ml_collections.ConfigDict):
  """What `vqlm train` / `vqlm compile` build from a config, nothing allocated or trained: the
  stage's trainer (model, optimizer, mesh; LM vocabularies are `vqlm compile`'s nominal one) and
  its train state from `jax.eval_shape` of the task's init on an example batch's shapes. Data
  sizes (`train.seq_len`, `data.image_size`) are checked where the data is made, not here: the
  batch is one short sequence, or one image of one code."""
  trainer, _, _ = compile_cmd.build(config)
  if config.stage == "lm":
    batch = {
      k: jax.ShapeDtypeStruct((1, 16), jnp.float32 if k == "loss_weights" else jnp.int32)
      for k in ("tokens", "targets", "segment_ids", "positions", "loss_weights")
    }
  else:
    f = ImageTokenizer(**as_kwargs(config.model)).factor
    batch = {"image": jax.ShapeDtypeStruct((1, f, f, 3), jnp.float32)}
  with trainer.context():
    return jax.eval_shape(trainer.task.init, jax.random.key(0), batch)


@settings(max_examples=50, deadline=None, database=None)
@given(config_overrides())
@example(("configs/lm.py:size=tiny", [("train", "{}")]))
@example(("configs/lm.py:size=tiny", [("mesh.rules.x", "1")]))
@example(("configs/lm.py:size=tiny", [("mesh.rules.0", "1")]))
@example(("configs/lm.py:size=tiny", [("model.head_dim", 2**50)]))
@example(("configs/lm.py:size=tiny", [("model.param_dtype", "1e+30")]))
@example(("configs/lm.py:size=tiny", [("model.code_levels", "abc")]))
@example(("configs/lm.py:size=tiny", [("optim.freeze", 0)]))
@example(("configs/tokenizer.py:size=tiny", [("model.decoder.channels", 0)]))
@example(("configs/tokenizer.py:size=tiny", [("model.encoder.channel_multipliers", "")]))
@example(("configs/tokenizer.py:size=tiny", [("model.bottleneck.codebook_size", 0)]))
@example(("configs/tokenizer.py:size=tiny", [("model.bottleneck.restart_after", 2**48)]))
def test_config_overrides_build_a_model_or_fail_in_one_line(case):
  spec, overrides = case
  argv = ["vqlm train", "--config", spec] + [f"--config.{k}={v}" for k, v in overrides]
  try:
    config = flag_lib.require_config(flag_lib.parse(argv, lambda f: None, config=True))
    state = _build_abstract(config)
  except USER_ERRORS as e:
    _check_one_line(e)
    event("a user error")
    return
  event("a model")
  assert jax.tree.leaves(state.params)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))


@settings(max_examples=10, deadline=None, database=None)
@given(
  case=st.sampled_from(
    [
      ("configs/lm.py:size=tiny", "train.seq_len"),
      ("configs/lm.py:size=tiny", "train.batch_size"),
      ("configs/tokenizer.py:size=tiny", "data.image_size"),
      ("configs/tokenizer.py:size=tiny", "train.batch_size"),
    ]
  ),
  value=st.integers(max_value=0),
)
def test_compile_refuses_example_batches_of_no_size(case, value):
  # `vqlm compile` builds its example batches from these sizes (numpy refused negative ones).
  spec, field = case
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    code = cli.main(["vqlm", "compile", "--config", spec, f"--config.{field}={value}"])
  assert code == 2 and err.getvalue().startswith(f"vqlm: error: config.{field}={value} must be")
  assert len(err.getvalue().strip().splitlines()) == 1


def test_a_zero_mesh_size_is_a_user_error():
  argv = ["vqlm train", "--config", "configs/lm.py:size=tiny", "--config.mesh.shape.fsdp=0"]
  config = flag_lib.require_config(flag_lib.parse(argv, lambda f: None, config=True))
  with pytest.raises(USER_ERRORS):
    _build_abstract(config)


# ------------------------------------------------------------------------------- image folders

S = 8  # the folder sources' image size
_FORMATS = {  # PIL mode -> formats that store it
  "1": ("PNG", "BMP"),
  "L": ("PNG", "JPEG", "BMP", "GIF", "TIFF"),
  "LA": ("PNG",),
  "P": ("PNG", "BMP", "GIF"),
  "RGB": ("PNG", "JPEG", "BMP", "TIFF", "WEBP"),
  "RGBA": ("PNG", "TIFF", "WEBP"),
  "CMYK": ("JPEG", "TIFF"),
  "I;16": ("PNG", "TIFF"),
  "F": ("TIFF",),
}
_EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif"}
_EXTENSIONS["WEBP"] = ".webp"


def _pil_image(mode: str, h: int, w: int, seed: int) -> Image.Image:
  rng = np.random.default_rng(seed)
  if mode == "I;16":
    return Image.fromarray(rng.integers(0, 2**16, (h, w), dtype=np.uint16))
  if mode == "F":
    return Image.fromarray(rng.random((h, w), dtype=np.float32))
  rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8))
  return rgba.convert("RGB").convert("P") if mode == "P" else rgba.convert(mode)


def _encode(image: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  image.save(buf, fmt)
  return buf.getvalue()


@st.composite
def good_images(draw):
  """(bytes, extension, (h, w)) of an image PIL reads whole: any mode, odd sizes, extreme
  aspect ratios."""
  h, w = draw(
    st.one_of(
      st.tuples(st.integers(1, 20), st.integers(1, 20)),
      st.sampled_from([(1, 1), (1, 300), (300, 1), (2, 150)]),
    )
  )
  mode = draw(st.sampled_from(sorted(_FORMATS)))
  fmt = draw(st.sampled_from(_FORMATS[mode]))
  image = _pil_image(mode, h, w, draw(st.integers(0, 2**32 - 1)))
  return _encode(image, fmt), _EXTENSIONS[fmt], (h, w)


def _png_header_only(width: int, height: int) -> bytes:
  """A PNG signature and a valid IHDR chunk claiming `width x height`, then nothing."""
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  chunk = b"IHDR" + ihdr
  return (
    b"\x89PNG\r\n\x1a\n"
    + struct.pack(">I", len(ihdr))
    + chunk
    + struct.pack(">I", zlib.crc32(chunk))
  )


@st.composite
def bad_files(draw):
  """(bytes, extension, must_fail) of a damaged file: random bytes, empty, a truncated or
  corrupted image, a header claiming a huge image. A truncated file may still decode (a cut in
  its last bytes), so only some must fail."""
  kind = draw(st.sampled_from(["random", "empty", "truncated", "corrupted", "bomb", "signature"]))
  ext = draw(st.sampled_from(sorted(set(_EXTENSIONS.values()) | {".jpeg", ".PNG", ".tiff"})))
  if kind == "random":
    return draw(st.binary(max_size=200)), ext, False
  if kind == "empty":
    return b"", ext, True
  if kind == "bomb":
    return _png_header_only(100_000, 100_000), ext, True
  if kind == "signature":
    return b"\x89PNG\r\n\x1a\n" + draw(st.binary(max_size=50)), ext, False
  data, ext, _ = draw(good_images())
  if kind == "truncated":
    return data[: draw(st.integers(0, len(data) - 1))], ext, False
  at = draw(st.integers(0, len(data) - 1))
  return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :], ext, False


_NAME_PARTS = st.one_of(
  st.text(st.characters(exclude_characters="/\x00", exclude_categories=("Cs",)), max_size=6),
  st.binary(max_size=4),  # not UTF-8: os.listdir gives such names surrogate-escaped
)


def _write(root: str, index: int, part, ext: str, data: bytes) -> str | None:
  """Writes `NN_<part><ext>` under root; its name as the folder source lists it (None when
  this file system refuses the name)."""
  if isinstance(part, bytes):
    part = os.fsdecode(part.replace(b"/", b"_").replace(b"\x00", b"_"))
  name = f"{index:02d}_{part}{ext}"
  try:
    with open(os.path.join(root, name), "wb") as f:
      f.write(data)
  except (OSError, UnicodeEncodeError):
    return None
  return name


def _snapshot(root: str) -> dict[str, bytes | None]:
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames:
      out[os.path.relpath(os.path.join(dirpath, name), root)] = None
    for name in filenames:
      with open(os.path.join(dirpath, name), "rb") as f:
        out[os.path.relpath(os.path.join(dirpath, name), root)] = f.read()
  return out


def _read_all(source) -> list[dict]:
  """Every example of a source; each is a correctly shaped RGB image."""
  items = [source[i] for i in range(len(source))]
  for item in items:
    assert item["image"].shape == (S, S, 3) and item["image"].dtype == np.uint8
    assert isinstance(item["text"], str)
  return items


def _folder_source(root: str, split: str):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # skipped and failed files are warned about, and counted
    try:
      return sources.get_source("folder", split=split, data_dir=root, image_size=S)
    except USER_ERRORS as e:
      _check_one_line(e)
      return None


def _served(source) -> dict[str, dict] | None:
  """file -> item of every example served, or None when none could be read (a user error)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
      return {item["file"]: item for item in _read_all(source)}
    except USER_ERRORS as e:
      _check_one_line(e)
      return None


@settings(max_examples=40, deadline=None, database=None)
@given(
  good=st.lists(st.tuples(good_images(), _NAME_PARTS), max_size=3),
  bad=st.lists(st.tuples(bad_files(), _NAME_PARTS), max_size=5),
  image_folder=st.booleans(),
)
@example(  # a file name that is not UTF-8 (hashed for the train/validation split)
  good=[((_encode(_pil_image("RGB", 3, 3, 0), "PNG"), ".png", (3, 3)), b"\x80")],
  bad=[],
  image_folder=False,
)
def test_folder_of_damaged_images_serves_the_good_ones(good, bad, image_folder):
  with tempfile.TemporaryDirectory() as root:
    good_files, must_fail, all_files = {}, set(), set()
    for i, ((data, ext, size), part) in enumerate(good):
      name = _write(root, i, part, ext, data)
      if name:
        good_files[name] = size
        all_files.add(name)
    for i, ((data, ext, fails), part) in enumerate(bad, start=len(good)):
      name = _write(root, i, part, ext, data)
      if name:
        all_files.add(name)
        if fails:
          must_fail.add(name)
    if image_folder:
      os.mkdir(os.path.join(root, "folder.png"))  # a directory with an image's extension
    (open(os.path.join(root, "notes.txt"), "w")).close()  # not an image: not listed
    before = _snapshot(root)

    whole = _folder_source(root, "all")
    if whole is None:  # nothing readable: only possible without good images
      assert not good_files
    else:
      served = _served(whole)
      assert served is not None or not good_files
      served = served or {}
      event(f"served {min(len(served), 2)}+ files, {min(len(whole.skipped), 2)}+ skipped")
      for name, (h, w) in good_files.items():
        assert served[name]["original_size"] == (h, w)
      unreadable = set(whole.skipped) | set(whole.failed)
      assert must_fail <= unreadable
      assert set(served) | unreadable == all_files  # every image file is used or counted
      assert not set(served) & unreadable
      parts = [_folder_source(root, split) for split in ("train", "validation")]
      files = [set(p._files) if p is not None else set() for p in parts]
      assert not files[0] & files[1] and files[0] | files[1] == set(whole._files)
    assert _snapshot(root) == before  # nothing written, nothing lost


# ------------------------------------------------------------------------------- caption files

_TEXT = st.text(max_size=12)
_ROW_FILES = ["a.png", "b.jpg", "sub/c.png", "missing.png", "", "sub", "sub/../a.png", "A.PNG"]


@st.composite
def caption_files(draw):
  """(file name, bytes) of a captions file: rows of existing, missing, duplicated and odd names
  with random unicode texts, CRLF or LF, maybe a BOM; unless `clean`, also texts that are not
  strings, a split column on some rows only, blank and garbage lines, other CSV separators and
  headers, invalid UTF-8."""
  clean = draw(st.booleans())
  with_split = draw(st.sampled_from([False, True] if clean else [False, True, None]))

  def row() -> dict:
    r = {"file": draw(st.sampled_from(_ROW_FILES)), "text": draw(_TEXT)}
    if not clean and draw(st.integers(0, 4)) == 0:
      r["text"] = draw(st.one_of(st.none(), st.integers()))
    if with_split or (with_split is None and draw(st.booleans())):
      splits = ["train", "validation", "test"] + ([] if clean else ["", "x y"])
      r["split"] = draw(st.sampled_from(splits))
    return r

  rows = [row() for _ in range(draw(st.integers(0, 6)))]
  if draw(st.booleans()):
    name = "captions.jsonl"
    lines = [json.dumps(r, ensure_ascii=draw(st.booleans())) for r in rows]
    if not clean:
      lines += draw(st.lists(st.one_of(st.just(""), _TEXT, st.just("[1, 2]")), max_size=2))
    lines = draw(st.permutations(lines))
  else:
    name = "captions.csv"
    sep = "," if clean else draw(st.sampled_from([",", ";", "\t"]))
    headers = ["file,text,split" if with_split else "file,text"]
    header = draw(st.sampled_from(headers + ([] if clean else ["text,file", "file", ""])))
    out = io.StringIO()
    writer = csv.writer(out, delimiter=sep, lineterminator="\n")
    writer.writerow(header.split(",") if header else [])
    for r in rows:
      writer.writerow([r.get(k, "") for k in header.split(",") if k])
    lines = out.getvalue().split("\n")
  newline = draw(st.sampled_from(["\n", "\r\n"]))
  text = ("\ufeff" if draw(st.booleans()) else "") + newline.join(lines)
  data = text.encode("utf-8", "surrogatepass")  # a lone surrogate makes invalid UTF-8
  if not clean and draw(st.booleans()):
    at = draw(st.integers(0, len(data)))
    data = data[:at] + draw(st.binary(max_size=3)) + data[at:]
  return name, data


@settings(max_examples=50, deadline=None, database=None)
@given(captions=caption_files(), split=st.sampled_from(["all", "train", "validation", "test"]))
@example(captions=("captions.jsonl", b'{"file": "a.png", "text": "\xff"}\n'), split="all")
@example(
  captions=("captions.jsonl", b'\xef\xbb\xbf{"file": "a.png", "text": "t"}\r\n'), split="all"
)
@example(captions=("captions.csv", b"\xef\xbb\xbffile,text\r\na.png,t\r\n"), split="all")
def test_caption_files_give_a_valid_source_or_fail_in_one_line(captions, split):
  name, data = captions
  with tempfile.TemporaryDirectory() as root:
    os.mkdir(os.path.join(root, "sub"))
    for i, file in enumerate(["a.png", "b.jpg", "sub/c.png"]):
      _pil_image("RGB", 5 + i, 7, i).save(os.path.join(root, file))
    with open(os.path.join(root, name), "wb") as f:
      f.write(data)
    before = _snapshot(root)
    source = _folder_source(root, split)
    event("a source" if source is not None else "a user error")
    if source is not None:
      items = _served(source)
      assert items is not None  # the three images are readable
    assert _snapshot(root) == before
  if source is not None and name.endswith(".jsonl"):
    # Each example is a row of the file: its image and one of that image's captions.
    lines = data.decode("utf-8-sig").split("\n")  # JSON Lines: \n ends a line, nothing else
    rows = [json.loads(line) for line in lines if line.strip()]
    for item in items.values():
      assert item["text"] in [r["text"] for r in rows if r["file"] == item["file"]]


# ------------------------------------------------------------------------------------- prompts

_SPECIALS = st.sampled_from(["<boi>", "<eoi>", "<bos>", "<eos>", "<pad>", "<img:3>", "<unk>"])
_PROMPT = st.one_of(
  st.text(max_size=12),  # any unicode: control characters, lone surrogates, RTL marks, ...
  st.lists(st.one_of(_SPECIALS, st.text(max_size=3)), max_size=4).map("".join),
  st.sampled_from(["", " ", "\n\t\r", "\x00", "\ufeff"]),
)


@pytest.fixture(scope="module")
def lm_run(tiny):
  return vqlm.load(tiny["lm"])


@settings(max_examples=15, deadline=None, database=None)
@given(prompts=st.one_of(st.lists(_PROMPT, min_size=1, max_size=3), st.just([]), _PROMPT))
@example(prompts=["a red square " * 40])  # longer than the run's training sequences
@example(prompts=["<boi>" * 20 + "<eoi>"])
@example(prompts=[None, 3])
@example(prompts="a red square")  # one string, not a list: not one image per character
@example(prompts=["\ud800"])  # a lone surrogate: no UTF-8 for SentencePiece
def test_prompts_generate_images_or_fail_in_one_line(lm_run, prompts):
  try:
    images = lm_run.generate(prompts, batch_size=4, seed=0)
  except USER_ERRORS as e:
    _check_one_line(e)
    assert isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or not prompts
    return
  size = lm_run.tokenizer_run().image_size
  assert images.shape == (len(prompts), size, size, 3) and images.dtype == np.uint8


# ---------------------------------------------------------------------- vqlm caption --image


@st.composite
def not_images(draw):
  """(kind, bytes) of a path that is no image: random bytes, text, empty, a truncated PNG, a
  directory, a missing path."""
  kind = draw(st.sampled_from(["random", "text", "empty", "truncated", "directory", "missing"]))
  if kind == "random":
    return kind, draw(st.binary(max_size=300))
  if kind == "text":
    return kind, draw(st.text(max_size=50)).encode("utf-8", "surrogatepass")
  if kind == "truncated":
    data = _encode(_pil_image("RGB", 16, 16, 0), "PNG")
    return kind, data[: draw(st.integers(0, len(data) - 1))]
  return kind, b""


@settings(
  max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
  target=not_images(), ext=st.sampled_from([".png", ".jpg", ".txt", ""]), good_first=st.booleans()
)
def test_caption_of_a_file_that_is_no_image_is_one_line_naming_it(tiny, target, ext, good_first):
  kind, data = target
  with tempfile.TemporaryDirectory() as root:
    path = os.path.join(root, "input" + ext)
    if kind == "directory":
      os.mkdir(path)
    elif kind != "missing":
      with open(path, "wb") as f:
        f.write(data)
    good = os.path.join(root, "good.png")
    _pil_image("RGB", 16, 16, 1).save(good)
    images = [good, path] if good_first else [path]
    argv = ["vqlm", "caption", "--workdir", tiny["lm"]] + [f"--image={p}" for p in images]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      code = cli.main(argv)
    if code == 0:  # the random bytes or text happen to be an image (a netpbm "P1 1 1 0", ...)
      with Image.open(path) as image:
        image.load()
      return
  lines = err.getvalue().strip().splitlines()
  assert code == 2 and "Traceback" not in err.getvalue(), err.getvalue()
  assert len(lines) == 1 and lines[0].startswith(f"vqlm: error: --image {path} "), lines
  assert not out.getvalue()
