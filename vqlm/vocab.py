"""One id space for text, special tokens and image codes; saved as `vocab.json` with every run.

Layout (ids never overlap):

```
[0, text_size)                               SentencePiece ids, unchanged (<unk> = 0)
[text_size, text_size + len(specials))       specials, in order: pad bos eos boi eoi frame
[..., image_offset)                          num_reserved unused slots for future specials
[image_offset, image_offset + image_size)    image codes: id = image_offset + code
[size, padded_size)                          unused padding of the embedding table
```

Text comes first so stored SentencePiece ids are already unified ids (records keep `text_ids`
un-offset). The special block has a fixed width `len(specials) + num_reserved`: a later special
takes a reserved slot (append the name, decrement `num_reserved`) and no image id moves. `<pad>` is
an ordinary special, not id 0: padding is identified by `segment_ids == 0` / `loss_weights == 0`,
never by the pad id. Ids in `[size, padded_size)` are never produced; the sampler must mask them.

Chat specials (`CHAT_SPECIALS`: `<user>`, `<assistant>`) are not in the default block: a run that
needs them takes reserved slots with `vocab.with_specials(CHAT_SPECIALS)`, so every id of a vocab
saved before keeps its meaning (`new.extends(old)`) and an instruction-tuned run can start from it.
"""

from collections.abc import Sequence
import dataclasses
import json
import os
from typing import Any

import numpy as np

from vqlm.errors import UserError
from vqlm.text import TextTokenizer

DEFAULT_SPECIALS = ("pad", "bos", "eos", "boi", "eoi", "frame")
# Turn markers of the chat layout (`vqlm.data.sequences.chat`); added in reserved slots.
CHAT_SPECIALS = ("user", "assistant")
_FORMAT = "vqlm.vocab/1"


@dataclasses.dataclass(frozen=True)
class Vocab:
  """The unified vocabulary of the LM.

  Attributes:
    text_size: number of SentencePiece ids (`TextTokenizer.vocab_size`, not the requested size).
    image_size: codebook size K of the image tokenizer.
    grid: `(h, w)` of one image's code grid.
    specials: special token names, in id order; must include DEFAULT_SPECIALS.
    num_reserved: unused special slots after `specials`.
    text_model: path of the SentencePiece `.model`, relative to the run directory.
    pad_to: `padded_size` is `size` rounded up to a multiple of this (TPU-friendly tables).
  """

  text_size: int
  image_size: int
  grid: tuple[int, int]
  specials: tuple[str, ...] = DEFAULT_SPECIALS
  num_reserved: int = 10
  text_model: str = "text.model"
  pad_to: int = 128

  def __post_init__(self):
    object.__setattr__(self, "specials", tuple(self.specials))
    grid = tuple(self.grid) if isinstance(self.grid, (list, tuple)) else ()
    if len(grid) != 2 or not all(isinstance(g, (int, np.integer)) and g > 0 for g in grid):
      raise UserError(f"Vocab.grid={self.grid!r} must be two positive ints (h, w).")
    object.__setattr__(self, "grid", (int(grid[0]), int(grid[1])))
    if self.text_size <= 0:
      raise UserError(f"Vocab.text_size={self.text_size} must be > 0 (the SentencePiece size).")
    if self.image_size <= 0:
      raise UserError(f"Vocab.image_size={self.image_size} must be > 0 (the codebook size).")
    if self.num_reserved < 0:
      raise UserError(f"Vocab.num_reserved={self.num_reserved} must be >= 0.")
    if self.pad_to <= 0:
      raise UserError(f"Vocab.pad_to={self.pad_to} must be >= 1 (1 disables padding).")
    if len(set(self.specials)) != len(self.specials) or not all(
      isinstance(s, str) and s for s in self.specials
    ):
      raise UserError(f"Vocab.specials={self.specials} must be unique non-empty names.")
    missing = [s for s in DEFAULT_SPECIALS if s not in self.specials]
    if missing:
      raise UserError(f"Vocab.specials lacks {missing}; include all of {DEFAULT_SPECIALS}.")

  # ---- layout -------------------------------------------------------------------------------

  @property
  def special_offset(self) -> int:
    return self.text_size

  @property
  def image_offset(self) -> int:
    return self.text_size + len(self.specials) + self.num_reserved

  @property
  def size(self) -> int:
    """Number of used ids: text + specials + reserved + image codes."""
    return self.image_offset + self.image_size

  @property
  def padded_size(self) -> int:
    """`size` rounded up to a multiple of `pad_to`: the LM's embedding/output table size."""
    return -(-self.size // self.pad_to) * self.pad_to

  @property
  def tokens_per_image(self) -> int:
    return self.grid[0] * self.grid[1]

  def special(self, name: str) -> int:
    """Id of the special token `name` (e.g. "boi")."""
    try:
      return self.text_size + self.specials.index(name)
    except ValueError:
      raise UserError(f"Unknown special {name!r}; valid: {self.specials}.") from None

  @property
  def pad_id(self) -> int:
    return self.special("pad")

  @property
  def bos_id(self) -> int:
    return self.special("bos")

  @property
  def eos_id(self) -> int:
    return self.special("eos")

  @property
  def boi_id(self) -> int:
    return self.special("boi")

  @property
  def eoi_id(self) -> int:
    return self.special("eoi")

  @property
  def frame_id(self) -> int:
    return self.special("frame")

  @property
  def user_id(self) -> int:
    return self.special("user")

  @property
  def assistant_id(self) -> int:
    return self.special("assistant")

  def with_specials(self, names: Sequence[str]) -> "Vocab":
    """This vocab with `names` (those not present yet, in order) in the first reserved slots.

    No existing id moves (`image_offset` and `size` are unchanged), so parameters trained with
    this vocab stay valid under the result; `result.extends(self)` holds.
    """
    new = tuple(n for n in dict.fromkeys(names) if n not in self.specials)
    if len(new) > self.num_reserved:
      raise UserError(
        f"adding specials {list(new)} needs {len(new)} reserved slots but the vocab has "
        f"{self.num_reserved}; build the vocab with a larger num_reserved."
      )
    return dataclasses.replace(
      self, specials=self.specials + new, num_reserved=self.num_reserved - len(new)
    )

  def extends(self, other: "Vocab") -> bool:
    """True when every id of `other` means the same here: equal fields, except that this vocab's
    specials may continue `other`'s into its reserved slots (see `with_specials`)."""
    n = len(other.specials)
    return (
      self.specials[:n] == other.specials
      and self.image_offset == other.image_offset
      and dataclasses.replace(self, specials=other.specials, num_reserved=other.num_reserved)
      == other
    )

  # ---- id conversion (ints, NumPy arrays; jax arrays pass through without range checks) -------

  def image_token(self, code: Any) -> Any:
    """Image code(s) in `[0, image_size)` -> unified id(s). Ints and NumPy arrays are range
    checked (NumPy results are int32); other array types (jax) are offset unchecked."""
    if isinstance(code, (int, np.integer)):
      if not 0 <= code < self.image_size:
        raise UserError(
          f"image code {code} outside [0, {self.image_size}); check the codebook "
          "size in the vocab against the image tokenizer."
        )
      return int(code) + self.image_offset
    if isinstance(code, (np.ndarray, list, tuple)):
      code = np.asarray(code)
      if code.size and (code.min() < 0 or code.max() >= self.image_size):
        raise UserError(
          f"image codes span [{code.min()}, {code.max()}], outside [0, "
          f"{self.image_size}); check the codebook size against the tokenizer."
        )
      return code.astype(np.int32) + np.int32(self.image_offset)
    return code + self.image_offset

  def image_code(self, token: Any) -> Any:
    """Unified id(s) of image tokens -> code(s) in `[0, image_size)` (inverse of image_token)."""
    if isinstance(token, (int, np.integer)):
      if not self.is_image(token):
        raise UserError(
          f"id {token} is not an image token (image ids are [{self.image_offset}, {self.size}))."
        )
      return int(token) - self.image_offset
    if isinstance(token, (np.ndarray, list, tuple)):
      token = np.asarray(token)
      if not np.all(self.is_image(token)):
        raise UserError(
          f"ids outside the image range [{self.image_offset}, {self.size}); keep "
          "only image runs before image_code."
        )
      return (token - self.image_offset).astype(np.int32)
    return token - self.image_offset

  def _in(self, ids: Any, lo: int, hi: int) -> Any:
    if isinstance(ids, (int, np.integer)):
      return bool(lo <= ids < hi)
    if isinstance(ids, (list, tuple)):
      ids = np.asarray(ids)
    return (ids >= lo) & (ids < hi)

  def is_image(self, ids: Any) -> Any:
    return self._in(ids, self.image_offset, self.size)

  def is_text(self, ids: Any) -> Any:
    return self._in(ids, 0, self.text_size)

  def is_special(self, ids: Any) -> Any:
    """True on the special block, reserved slots included."""
    return self._in(ids, self.text_size, self.image_offset)

  def token_name(self, i: int) -> str:
    """Readable name of a non-text id: "<boi>", "<reserved_3>", "<img:17>"."""
    i = int(i)
    if self.is_image(i):
      return f"<img:{i - self.image_offset}>"
    if self.is_special(i):
      k = i - self.text_size
      return (
        f"<{self.specials[k]}>"
        if k < len(self.specials)
        else (f"<reserved_{k - len(self.specials)}>")
      )
    raise UserError(f"id {i} is not a special or image id of this vocab (size {self.size}).")

  def check_codes(self, codes: Any) -> np.ndarray:
    """Validates a code grid `[..., h, w]` against `grid`; returns it as int32."""
    codes = np.asarray(codes)
    if codes.ndim < 2 or codes.shape[-2:] != self.grid:
      raise UserError(
        f"codes of shape {codes.shape} do not end in the vocab grid {self.grid}; "
        "re-encode the data with the tokenizer this vocab was built for."
      )
    if not np.issubdtype(codes.dtype, np.integer):
      raise UserError(f"codes must be integers, got {codes.dtype}.")
    return codes.astype(np.int32)

  # ---- text -------------------------------------------------------------------------------

  def _check_tokenizer(self, tokenizer: TextTokenizer):
    if tokenizer.vocab_size != self.text_size:
      raise UserError(
        f"tokenizer has {tokenizer.vocab_size} pieces but vocab.text_size is "
        f"{self.text_size}; load the SentencePiece model saved with this vocab."
      )

  def encode_text(self, tokenizer: TextTokenizer, text: str) -> list[int]:
    """Text -> unified ids (equal to the SentencePiece ids; never special or image ids)."""
    self._check_tokenizer(tokenizer)
    return tokenizer.encode(text)

  def decode_text(
    self, tokenizer: TextTokenizer, ids: Sequence[int], *, keep_specials: bool = False
  ) -> str:
    """Unified ids -> text.

    With `keep_specials=False` specials and image ids are dropped and all text ids are decoded as
    one run. With `keep_specials=True` each special renders as `<name>` and each image id as
    `<img:CODE>`, joined without spaces to the decoded text runs between them:
    `[bos, "a", "red", boi, img3, eoi]` -> `"<bos>a red<boi><img:3><eoi>"`.

    Raises:
      ValueError: on ids outside `[0, size)` (e.g. from the padded tail of the table).
    """
    self._check_tokenizer(tokenizer)
    ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
    bad = [i for i in ids if not 0 <= i < self.size]
    if bad:
      raise UserError(
        f"ids {bad[:5]} are outside the vocab [0, {self.size}); mask ids >= size when sampling."
      )
    if not keep_specials:
      return tokenizer.decode([i for i in ids if i < self.text_size])
    parts, run = [], []
    for i in ids + [None]:
      if i is not None and i < self.text_size:
        run.append(i)
        continue
      if run:
        parts.append(tokenizer.decode(run))
        run = []
      if i is not None:
        parts.append(self.token_name(i))
    return "".join(parts)

  def text_tokenizer(self, run_dir: str) -> TextTokenizer:
    """Loads the SentencePiece model `run_dir/text_model` and checks its size."""
    tokenizer = TextTokenizer.load(os.path.join(run_dir, self.text_model))
    self._check_tokenizer(tokenizer)
    return tokenizer

  # ---- persistence --------------------------------------------------------------------------

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["grid"] = list(self.grid)
    d["specials"] = list(self.specials)
    return {"format": _FORMAT, **d}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Vocab":
    d = dict(d)
    fmt = d.pop("format", _FORMAT)
    if fmt != _FORMAT:
      raise UserError(
        f"vocab format {fmt!r} is not {_FORMAT!r}; this vocab.json is from "
        "another program or version."
      )
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
      raise UserError(f"unknown vocab keys {unknown}; valid keys: {names}.")
    d["grid"] = tuple(d["grid"])
    if "specials" in d:
      d["specials"] = tuple(d["specials"])
    return cls(**d)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)

  @classmethod
  def from_json(cls, text: str) -> "Vocab":
    return cls.from_dict(json.loads(text))

  def save(self, path: str) -> None:
    with open(path, "w") as f:
      f.write(self.to_json() + "\n")

  @classmethod
  def load(cls, path: str) -> "Vocab":
    with open(path) as f:
      return cls.from_json(f.read())
