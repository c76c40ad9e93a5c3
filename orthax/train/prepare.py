"""Text files → the trainer's token files, with a Hugging Face ``tokenizers``
tokenizer (``pip install 'orthax-optim[data]'``).

:func:`prepare` reads UTF-8 text files in chunks, encodes them with a
tokenizer you give (a ``tokenizer.json``, e.g. GPT-2's) or one it trains on
the same text (byte-level BPE, :func:`train_tokenizer`), ends each file with
the end-of-text token when the tokenizer has one, and writes

* ``<out>/train.npy`` and ``<out>/val.npy``: the ids (``uint16`` when the
  vocabulary fits, else ``uint32``), the last ``val_fraction`` of the tokens
  held out, read by ``data.source='files'``;
* ``<out>/tokenizer.json``: the tokenizer used;
* ``<out>/meta.json``: vocabulary size, dtype, token counts, the inputs and
  the ``--config.data.*`` flags that train on the files;
* ``<out>/flags.txt``: the same flags as an absl flag file (one per line;
  ``orthax-train --flagfile=<out>/flags.txt``).

Tokens are streamed to disk, so a corpus larger than memory is fine.

Example::

    orthax-prepare-data --input='texts/*.txt' --vocab_size=4096 --out=data/
    orthax-prepare-data --input=corpus.txt --tokenizer=gpt2/tokenizer.json \
        --out=data/
    orthax-train --config=lm_cpu:muon --flagfile=data/flags.txt
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Iterator, Sequence

import numpy as np

END_OF_TEXT = '<|endoftext|>'
_CHUNK_CHARS = 1 << 20


def _tokenizers():
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("orthax.train.prepare needs Hugging Face tokenizers: "
                      "pip install 'orthax-optim[data]'") from e
  return tokenizers


def train_tokenizer(files: Sequence[str], vocab_size: int) -> Any:
  """A byte-level BPE ``tokenizers.Tokenizer`` of ``vocab_size`` ids
  (GPT-2's scheme: every byte representable, so any text encodes) trained on
  ``files``, with :data:`END_OF_TEXT` as a special token.

  Raises:
    ValueError: ``vocab_size`` below 257 (the 256 bytes and the end token).
  """
  if vocab_size < 257:
    raise ValueError(f'vocab_size must be at least 257 (256 bytes and '
                     f'{END_OF_TEXT}), got {vocab_size}.')
  tk = _tokenizers()
  tok = tk.Tokenizer(tk.models.BPE())
  tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tk.decoders.ByteLevel()
  trainer = tk.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
      initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  tok.train(list(files), trainer)
  return tok


def load_tokenizer(path: str) -> Any:
  """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` file.

  Raises:
    ValueError: naming ``path`` when it is missing or not a tokenizer.
  """
  tk = _tokenizers()
  if not os.path.isfile(path):
    raise ValueError(f'tokenizer {path!r}: no such file.')
  try:
    return tk.Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises plain Exception
    raise ValueError(f'tokenizer {path!r} is not a tokenizers JSON file '
                     f'({e}).') from None


def _chunks(path: str) -> Iterator[str]:
  """``path``'s text in pieces of about 1M characters, cut at line ends."""
  with open(path, encoding='utf-8') as f:
    buf: list[str] = []
    size = 0
    for line in f:
      buf.append(line)
      size += len(line)
      if size >= _CHUNK_CHARS:
        yield ''.join(buf)
        buf, size = [], 0
    if buf:
      yield ''.join(buf)


def _check_inputs(files: Sequence[str]) -> None:
  if not files:
    raise ValueError('prepare: no input files.')
  for p in files:
    if not os.path.isfile(p):
      raise ValueError(f'input {p!r}: no such file.')
    try:
      with open(p, encoding='utf-8') as f:
        f.read(1 << 16)
    except UnicodeDecodeError as e:
      raise ValueError(f'input {p!r} is not UTF-8 text ({e}).') from None


def prepare(files: Sequence[str], out_dir: str, *,
            tokenizer: str | None = None, vocab_size: int = 4096,
            val_fraction: float = 0.01) -> dict[str, Any]:
  """Tokenizes ``files`` into ``out_dir`` (see the module docstring);
  returns the ``meta.json`` record.

  Args:
    files: UTF-8 text files, in order.
    out_dir: where the token files, tokenizer and metadata go.
    tokenizer: a ``tokenizer.json`` to use; ``None``: train a byte-level
      BPE tokenizer of ``vocab_size`` ids on ``files``.
    vocab_size: size of the trained tokenizer (ignored with ``tokenizer``).
    val_fraction: the share of tokens (the last ones) held out, in (0, 1).

  Raises:
    ValueError: a missing or non-UTF-8 input, a bad tokenizer file, a
      ``val_fraction`` outside (0, 1), or a corpus too small to split.
  """
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f'val_fraction must be in (0, 1), got {val_fraction}.')
  files = [os.fspath(p) for p in files]
  _check_inputs(files)
  tok = (train_tokenizer(files, vocab_size) if tokenizer is None
         else load_tokenizer(tokenizer))
  vocab = int(tok.get_vocab_size(with_added_tokens=True))
  dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
  eot = tok.token_to_id(END_OF_TEXT)
  os.makedirs(out_dir, exist_ok=True)
  total = 0
  with tempfile.TemporaryFile(dir=out_dir) as raw:
    for path in files:
      for text in _chunks(path):
        ids = np.asarray(tok.encode(text).ids, dtype=dtype)
        raw.write(ids.tobytes())
        total += ids.size
      if eot is not None:
        raw.write(np.asarray([eot], dtype=dtype).tobytes())
        total += 1
    n_val = int(round(total * val_fraction))
    if n_val < 2 or total - n_val < 2:
      raise ValueError(f'{total} tokens cannot be split at val_fraction='
                       f'{val_fraction} (each side needs at least 2).')
    raw.flush()
    tokens = np.memmap(raw, dtype=dtype, mode='r', shape=(total,))
    for name, part in (('train', tokens[:total - n_val]),
                       ('val', tokens[total - n_val:])):
      arr = np.lib.format.open_memmap(os.path.join(out_dir, f'{name}.npy'),
                                      mode='w+', dtype=dtype,
                                      shape=part.shape)
      arr[:] = part
      arr.flush()
      del arr
    del tokens
  tok.save(os.path.join(out_dir, 'tokenizer.json'))
  return _write_meta(out_dir, files, tokenizer, vocab, dtype, total, n_val,
                     END_OF_TEXT if eot is not None else None)


def _write_meta(out_dir, files, tokenizer, vocab, dtype, total, n_val,
                end_of_text):
  """``meta.json`` and ``flags.txt``; ``end_of_text`` is the separator
  written between files, ``None`` where the tokenizer has no such token
  (the files are joined without one)."""
  train_path = os.path.abspath(os.path.join(out_dir, 'train.npy'))
  val_path = os.path.abspath(os.path.join(out_dir, 'val.npy'))
  flags = ['--config.data.source=files',
           f'--config.data.train_path={train_path}',
           f'--config.data.val_path={val_path}',
           f'--config.data.vocab_size={vocab}']
  meta = {'vocab_size': vocab, 'dtype': dtype.name,
          'train_tokens': total - n_val, 'val_tokens': n_val,
          'inputs': [os.path.abspath(p) for p in files],
          'tokenizer': (os.path.abspath(tokenizer) if tokenizer
                        else 'trained (byte-level BPE)'),
          'end_of_text': end_of_text, 'flags': flags}
  with open(os.path.join(out_dir, 'meta.json'), 'w') as f:
    json.dump(meta, f, indent=1)
  with open(os.path.join(out_dir, 'flags.txt'), 'w') as f:
    # absl's flag-file format: one flag per line, so that a path with
    # spaces stays one value.
    f.write('# orthax-train --flagfile=<this file>: train on these tokens\n'
            + ''.join(flag + '\n' for flag in flags))
  return meta
