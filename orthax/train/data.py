"""Token data for the reference GPT trainer: corpora, splits and loaders.

Two sources are supported:

* ``'embedded'``: byte-level English text that ships with Python itself (the
  ``pydoc_data`` help topics, ~465 KB), so training works offline with no
  download. Tokens are the UTF-8 bytes, vocabulary :data:`VOCAB_BYTES`.
* ``'files'``: pre-tokenized user files, memory-mapped (``.npy`` arrays or raw
  ``.bin`` buffers of ``uint16``/``uint32`` ids), so corpora larger than RAM
  work.

Training batches are random windows drawn by :meth:`TokenLoader.batch` as a
pure function of ``(seed, step)``: no iterator state exists, so resuming from a
checkpoint at step ``k`` reproduces exactly the batches of an uninterrupted
run. Evaluation walks consecutive non-overlapping windows deterministically
(:meth:`TokenLoader.eval_batches`).
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np

VOCAB_BYTES = 256
SOURCES = ('embedded', 'files')
_TOKEN_DTYPES = (np.dtype(np.uint16), np.dtype(np.uint32))


def embedded_text() -> bytes:
  """Returns the default corpus: Python's bundled help topics, UTF-8 encoded.

  The values of ``pydoc_data.topics.topics`` in sorted key order, joined with
  blank lines. This is real English prose (with code samples) available on
  any standard Python installation.

  Raises:
    RuntimeError: ``pydoc_data`` is not installed (some stripped Pythons).
  """
  try:
    from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError(
        'the embedded corpus needs the standard-library module pydoc_data, '
        'which this Python installation lacks; use source="files" with your '
        'own token files instead') from e
  table = topics.topics
  return '\n\n'.join(table[k] for k in sorted(table)).encode('utf-8')


def encode_bytes(text: str | bytes) -> np.ndarray:
  """Byte-level tokenization: ``uint16`` ids 0..255 of the UTF-8 bytes."""
  if isinstance(text, str):
    text = text.encode('utf-8')
  return np.frombuffer(bytes(text), dtype=np.uint8).astype(np.uint16)


def decode_bytes(tokens) -> str:
  """Inverse of :func:`encode_bytes` (invalid UTF-8 becomes U+FFFD)."""
  ids = np.asarray(tokens).reshape(-1)
  if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_BYTES):
    raise ValueError(f'byte token ids must lie in [0, {VOCAB_BYTES}), got '
                     f'range [{ids.min()}, {ids.max()}]')
  return ids.astype(np.uint8).tobytes().decode('utf-8', errors='replace')


def _token_dtype(dtype, path) -> np.dtype:
  """Normalizes ``dtype``, allowing only ``uint16`` and ``uint32``."""
  try:
    dt = np.dtype(dtype)
  except TypeError as e:
    raise ValueError(f'{path}: invalid token dtype {dtype!r}') from e
  if dt not in _TOKEN_DTYPES:
    raise ValueError(f'{path}: token dtype must be uint16 or uint32, got {dt}')
  return dt


def load_tokens(path, dtype=None) -> np.ndarray:
  """Memory-maps a 1-D token file (read-only).

  Args:
    path: a ``.npy`` file (any 1-D ``uint16``/``uint32`` array saved with
      ``np.save``) or a ``.bin`` file (raw native-endian ids, no header).
    dtype: element type of a ``.bin`` file, ``uint16`` (default) or
      ``uint32``. For ``.npy`` the header decides; a conflicting ``dtype`` is
      an error.

  Returns:
    A read-only ``np.memmap`` of shape ``[num_tokens]``.

  Raises:
    ValueError: the file is missing or empty, has another extension, dtype
      or rank; the message names the path and the problem.
  """
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in ('.npy', '.bin'):
    raise ValueError(f'{path}: unsupported token file extension {ext!r}; '
                     'expected .npy or .bin')
  if not os.path.isfile(path):
    raise ValueError(f'{path}: token file does not exist')
  if os.path.getsize(path) == 0:
    raise ValueError(f'{path}: token file is empty')
  if ext == '.bin':
    dt = _token_dtype(np.uint16 if dtype is None else dtype, path)
    size = os.path.getsize(path)
    if size % dt.itemsize:
      raise ValueError(f'{path}: size {size} bytes is not a multiple of the '
                       f'{dt} item size {dt.itemsize}')
    return np.memmap(path, dtype=dt, mode='r')
  try:
    tokens = np.load(path, mmap_mode='r', allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{path}: not a readable .npy array ({e})') from e
  if tokens.ndim != 1:
    raise ValueError(f'{path}: token array must be 1-D, got shape '
                     f'{tokens.shape}')
  dt = _token_dtype(tokens.dtype, path)
  if dtype is not None and np.dtype(dtype) != dt:
    raise ValueError(f'{path}: file holds {dt} tokens but dtype={dtype!r} '
                     'was requested')
  if tokens.size == 0:
    raise ValueError(f'{path}: token array is empty')
  return tokens


def split_tokens(tokens, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Contiguous train/validation split (views, no copy; memmaps stay mapped).

  Args:
    tokens: 1-D token array.
    val_fraction: share of tokens for validation, strictly in ``(0, 1)``.

  Returns:
    ``(train, val)``: ``val`` is the last ``round(len * val_fraction)``
    tokens, ``train`` everything before it. They do not overlap.
  """
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f'val_fraction must be in (0, 1), got {val_fraction}')
  n = len(tokens)
  n_val = int(round(n * val_fraction))
  if n_val < 1 or n_val >= n:
    raise ValueError(f'val_fraction={val_fraction} of {n} tokens leaves an '
                     f'empty split ({n - n_val} train, {n_val} val)')
  return tokens[:n - n_val], tokens[n - n_val:]


def _positive_int(name: str, value) -> int:
  """Returns ``value`` as an int, or raises if it is not a positive int."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f'{name} must be a positive int, got {value!r}')
  if value < 1:
    raise ValueError(f'{name} must be a positive int, got {value}')
  return int(value)


class TokenLoader:
  """Batches of next-token windows over a 1-D token array.

  Each example is a window of ``seq_len + 1`` consecutive tokens; ``inputs``
  are its first ``seq_len`` tokens and ``targets`` the last ``seq_len``
  (inputs shifted by one). Windows never leave ``tokens``, so loaders built
  on the two halves of :func:`split_tokens` never mix train and val data.

  Attributes:
    tokens: the token array (may be a memmap; never copied whole).
    batch_size: examples per batch.
    seq_len: tokens per example.
    seed: seed of the random training windows.
  """

  def __init__(self, tokens, batch_size: int, seq_len: int, seed: int = 0,
               vocab_size: int | None = None):
    if np.ndim(tokens) != 1:
      raise ValueError(f'tokens must be 1-D, got shape {np.shape(tokens)}')
    self.batch_size = _positive_int('batch_size', batch_size)
    self.seq_len = _positive_int('seq_len', seq_len)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) \
        or seed < 0:
      raise ValueError(f'seed must be a non-negative int, got {seed!r}')
    self.seed = int(seed)
    if len(tokens) < self.seq_len + 1:
      raise ValueError(f'seq_len={self.seq_len} needs at least '
                       f'{self.seq_len + 1} tokens, only {len(tokens)} '
                       'available')
    self.tokens = tokens
    self.vocab_size = (None if vocab_size is None
                       else _positive_int('vocab_size', vocab_size))

  @property
  def num_tokens(self) -> int:
    """Number of tokens in the underlying array."""
    return len(self.tokens)

  @property
  def tokens_per_batch(self) -> int:
    """Input tokens per batch, ``batch_size * seq_len``."""
    return self.batch_size * self.seq_len

  def window_starts(self, step: int) -> np.ndarray:
    """Start offsets of the windows of training batch ``step``.

    Drawn uniformly from ``[0, num_tokens - seq_len - 1]`` (inclusive) with
    ``np.random.default_rng((seed, step))``: a pure function of ``(seed,
    step)``, independent of which batches were drawn before. This is what
    makes checkpoint resume exact.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) \
        or step < 0:
      raise ValueError(f'step must be a non-negative int, got {step!r}')
    rng = np.random.default_rng((self.seed, int(step)))
    return rng.integers(0, self.num_tokens - self.seq_len,
                        size=self.batch_size, dtype=np.int64)

  def _gather(self, starts: np.ndarray) -> dict[str, np.ndarray]:
    idx = starts[:, None] + np.arange(self.seq_len + 1, dtype=np.int64)
    windows = np.array(self.tokens[idx], dtype=np.int64)
    if self.vocab_size is not None and windows.size:
      top = int(windows.max())
      if top >= self.vocab_size:  # the embedding lookup would read nothing
        at = int(starts[np.argmax(windows.max(axis=1))])
        raise ValueError(
            f'token id {top} (in the window at offset {at}) is not below '
            f'vocab_size={self.vocab_size}: the vocabulary is too small for '
            'these tokens, or token_dtype does not match the file.')
    windows = windows.astype(np.int32)
    return {'inputs': windows[:, :-1], 'targets': windows[:, 1:]}

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """Training batch ``step`` (deterministic in ``(seed, step)``).

    Returns:
      ``{'inputs': int32[batch_size, seq_len], 'targets': same}``: for a
      window starting at ``s``, inputs are ``tokens[s : s + seq_len]`` and
      targets ``tokens[s + 1 : s + 1 + seq_len]``.
    """
    return self._gather(self.window_starts(step))

  @property
  def num_eval_batches(self) -> int:
    """Full batches :meth:`eval_batches` yields when not capped."""
    return (self.num_tokens - 1) // self.seq_len // self.batch_size

  def eval_batches(
      self, max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Deterministic pass over consecutive non-overlapping windows.

    Window ``i`` starts at ``i * seq_len``; windows are grouped
    ``batch_size`` at a time from the start of the array and a final
    partial batch is dropped.

    Args:
      max_batches: stop after this many batches (``None``: all of them).

    Returns:
      An iterator of batches shaped like :meth:`batch`'s.

    Raises:
      ValueError: (eagerly) the array is too short for one full batch.
    """
    total = self.num_eval_batches
    if total == 0:
      raise ValueError(
          f'one eval batch of {self.batch_size} x {self.seq_len} needs at '
          f'least {self.tokens_per_batch + 1} tokens, only {self.num_tokens} '
          'available')
    if max_batches is not None:
      total = min(total, _positive_int('max_batches', max_batches))
    return self._eval_iter(total)

  def _eval_iter(self, total: int) -> Iterator[dict[str, np.ndarray]]:
    for i in range(total):
      first = i * self.batch_size
      starts = np.arange(first, first + self.batch_size,
                         dtype=np.int64) * self.seq_len
      yield self._gather(starts)

  def __repr__(self) -> str:
    return (f'TokenLoader(num_tokens={self.num_tokens}, batch_size='
            f'{self.batch_size}, seq_len={self.seq_len}, seed={self.seed})')


def make_loaders(
    source: str = 'embedded',
    *,
    batch_size: int,
    seq_len: int,
    seed: int = 0,
    val_fraction: float = 0.1,
    train_path=None,
    val_path=None,
    eval_batch_size: int | None = None,
    token_dtype=None,
    vocab_size: int | None = None,
) -> tuple[TokenLoader, TokenLoader, int]:
  """Builds the train and validation loaders and the vocabulary size.

  Args:
    source: ``'embedded'`` (byte-level :func:`embedded_text`) or ``'files'``.
    batch_size: training batch size.
    seq_len: tokens per example.
    seed: training seed; the val loader uses ``seed + 1``.
    val_fraction: validation share when the val split is cut from the
      training tokens (``'embedded'``, or ``'files'`` without ``val_path``).
    train_path: ``.npy``/``.bin`` training tokens (``'files'`` only).
    val_path: optional separate validation tokens (``'files'`` only).
    eval_batch_size: val loader batch size (default ``batch_size``).
    token_dtype: element type of ``.bin`` files (see :func:`load_tokens`).
    vocab_size: vocabulary size. ``'embedded'``: defaults to
      :data:`VOCAB_BYTES` (a larger value pads the embedding). ``'files'``:
      trusted as given; if ``None`` it is ``max token + 1`` over both splits,
      which reads the whole files once, so pass it for large corpora.

  Returns:
    ``(train_loader, val_loader, vocab_size)``.
  """
  if source == 'embedded':
    if train_path is not None or val_path is not None:
      raise ValueError('train_path/val_path are only used with '
                       'source="files"')
    train, val = split_tokens(encode_bytes(embedded_text()), val_fraction)
    if vocab_size is None:
      vocab_size = VOCAB_BYTES
    elif vocab_size < VOCAB_BYTES:
      raise ValueError(f'byte-level vocab_size must be >= {VOCAB_BYTES}, got '
                       f'{vocab_size}')
  elif source == 'files':
    if train_path is None:
      raise ValueError('source="files" requires train_path '
                       '(data.train_path)')
    train = load_tokens(train_path, token_dtype)
    if val_path is not None:
      val = load_tokens(val_path, token_dtype)
    else:
      train, val = split_tokens(train, val_fraction)
    if vocab_size is None:
      vocab_size = int(max(train.max(), val.max())) + 1
  else:
    raise ValueError(f'unknown data source {source!r}; valid sources: '
                     f'{", ".join(SOURCES)}')
  vocab_size = _positive_int('vocab_size', vocab_size)
  loaders = []
  for split, tokens, size, split_seed in (
      ('training', train, batch_size, seed),
      ('validation', val, eval_batch_size or batch_size, seed + 1)):
    try:
      loaders.append(TokenLoader(tokens, size, seq_len, split_seed,
                                 vocab_size))
    except ValueError as e:
      raise ValueError(f'the {split} tokens: {e}') from None
  return loaders[0], loaders[1], vocab_size
