"""Tests for the trainer's data layer (``orthax.train.data``)."""

from __future__ import annotations

import numpy as np
import pytest

from orthax.train import data


def _is_memmap(x) -> bool:
  return isinstance(x, np.memmap) or isinstance(getattr(x, 'base', None),
                                                np.memmap)


def _check_windows(loader, batch, starts):
  tokens = np.asarray(loader.tokens)
  for b, s in enumerate(starts):
    np.testing.assert_array_equal(batch['inputs'][b],
                                  tokens[s:s + loader.seq_len])
    np.testing.assert_array_equal(batch['targets'][b],
                                  tokens[s + 1:s + 1 + loader.seq_len])


# Corpus and byte tokenization.


def test_embedded_text_is_real_english():
  text = data.embedded_text()
  assert isinstance(text, bytes)
  assert len(text) > 400_000
  assert b'The ' in text and b'def ' in text
  text.decode('utf-8')  # Valid UTF-8.


def test_encode_decode_round_trip():
  s = 'Hello, wörld — ∑ 🙂\n'
  ids = data.encode_bytes(s)
  assert ids.dtype == np.uint16 and ids.max() < data.VOCAB_BYTES
  assert data.decode_bytes(ids) == s
  assert data.decode_bytes(data.encode_bytes(s.encode())) == s
  corpus = data.embedded_text()
  assert data.decode_bytes(data.encode_bytes(corpus)) == corpus.decode()
  assert data.decode_bytes([0xff]) == '\ufffd'


# Loader batches.


def test_batch_shapes_and_shift():
  tokens = data.encode_bytes(data.embedded_text()[:20_000])
  loader = data.TokenLoader(tokens, batch_size=4, seq_len=32, seed=3)
  assert loader.num_tokens == 20_000
  assert loader.tokens_per_batch == 128
  batch = loader.batch(7)
  assert set(batch) == {'inputs', 'targets'}
  for v in batch.values():
    assert v.shape == (4, 32) and v.dtype == np.int32
  np.testing.assert_array_equal(batch['targets'][:, :-1],
                                batch['inputs'][:, 1:])
  _check_windows(loader, batch, loader.window_starts(7))


def test_batch_is_pure_function_of_seed_and_step():
  tokens = np.arange(10_000, dtype=np.uint32)
  a = data.TokenLoader(tokens, 8, 16, seed=5)
  b = data.TokenLoader(tokens, 8, 16, seed=5)
  b.batch(0), b.batch(1)  # History must not matter.
  for step in (0, 3, 1000):
    for k in ('inputs', 'targets'):
      np.testing.assert_array_equal(a.batch(step)[k], b.batch(step)[k])
  assert not np.array_equal(a.batch(0)['inputs'], a.batch(1)['inputs'])
  c = data.TokenLoader(tokens, 8, 16, seed=6)
  assert not np.array_equal(a.batch(0)['inputs'], c.batch(0)['inputs'])
  with pytest.raises(ValueError, match='step'):
    a.batch(-1)


def test_windows_fit_and_reach_last_start():
  n, seq_len = 40, 8
  loader = data.TokenLoader(np.arange(n, dtype=np.uint16), 16, seq_len)
  starts = np.concatenate([loader.window_starts(s) for s in range(200)])
  assert starts.min() == 0
  assert starts.max() == n - seq_len - 1  # Inclusive upper end is drawn.
  # The exact fit: seq_len + 1 tokens has a single window.
  tight = data.TokenLoader(np.arange(9, dtype=np.uint16), 2, seq_len)
  np.testing.assert_array_equal(tight.window_starts(0), [0, 0])
  np.testing.assert_array_equal(tight.batch(0)['targets'][0], np.arange(1, 9))


def test_split_never_mixes_train_and_val():
  # Train part: values 0..99; val part: values 100..149.
  tokens = np.concatenate([np.arange(9_000) % 100, 100 + np.arange(1_000) % 50])
  tokens = tokens.astype(np.uint16)
  train, val = data.split_tokens(tokens, 0.1)
  assert len(val) == 1_000 and len(train) == 9_000
  assert np.shares_memory(train, tokens) and np.shares_memory(val, tokens)
  assert train.max() < 100 and val.min() >= 100
  tl = data.TokenLoader(train, 16, 64, seed=1)
  vl = data.TokenLoader(val, 4, 64, seed=2)
  for step in range(100):
    starts = tl.window_starts(step)
    assert starts.max() <= len(train) - 64 - 1
    batch = tl.batch(step)
    assert batch['inputs'].max() < 100 and batch['targets'].max() < 100
    vb = vl.batch(step)
    assert vb['inputs'].min() >= 100 and vb['targets'].min() >= 100
  evals = list(vl.eval_batches())
  assert len(evals) == vl.num_eval_batches == (1_000 - 1) // 64 // 4
  for b in evals:
    assert b['inputs'].min() >= 100 and b['targets'].min() >= 100
  for b in tl.eval_batches(max_batches=3):
    assert b['inputs'].max() < 100 and b['targets'].max() < 100


def test_eval_batches_cover_consecutive_windows():
  n, bs, seq_len = 1_000, 3, 10
  loader = data.TokenLoader(np.arange(n, dtype=np.uint32), bs, seq_len)
  batches = list(loader.eval_batches())
  assert len(batches) == (n - 1) // seq_len // bs == 33
  inputs = np.concatenate([b['inputs'] for b in batches])
  targets = np.concatenate([b['targets'] for b in batches])
  windows = len(batches) * bs
  np.testing.assert_array_equal(inputs.reshape(-1), np.arange(windows *
                                                              seq_len))
  np.testing.assert_array_equal(targets, inputs + 1)
  again = list(loader.eval_batches())
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a['inputs'], b['inputs'])
  assert len(list(loader.eval_batches(max_batches=5))) == 5
  assert len(list(loader.eval_batches(max_batches=500))) == 33


def test_eval_batches_too_short():
  loader = data.TokenLoader(np.arange(50, dtype=np.uint16), 8, 10)
  with pytest.raises(ValueError, match='81 tokens'):
    loader.eval_batches()  # Raised eagerly, not on first next().


@pytest.mark.parametrize('kwargs, match', [
    (dict(batch_size=2, seq_len=100), r'101 tokens.*50'),
    (dict(batch_size=0, seq_len=4), 'batch_size'),
    (dict(batch_size=2, seq_len=0), 'seq_len'),
    (dict(batch_size=2.0, seq_len=4), 'batch_size'),
    (dict(batch_size=2, seq_len=4, seed=-1), 'seed'),
])
def test_loader_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.TokenLoader(np.arange(50, dtype=np.uint16), **kwargs)


@pytest.mark.parametrize('frac', [0.0, 1.0, -0.1, 1.5])
def test_split_fraction_out_of_range(frac):
  with pytest.raises(ValueError, match='val_fraction'):
    data.split_tokens(np.arange(100), frac)


# Token files.


@pytest.mark.parametrize('dtype', [np.uint16, np.uint32])
@pytest.mark.parametrize('ext', ['.npy', '.bin'])
def test_file_round_trip(tmp_path, dtype, ext):
  tokens = (np.arange(5_000) * 7 % 1_000).astype(dtype)
  path = tmp_path / f'tokens{ext}'
  if ext == '.npy':
    np.save(path, tokens)
    loaded = data.load_tokens(path)
  else:
    tokens.tofile(path)
    loaded = data.load_tokens(str(path), dtype=dtype)
  assert _is_memmap(loaded)
  assert loaded.dtype == dtype and loaded.shape == (5_000,)
  np.testing.assert_array_equal(loaded, tokens)

  train_l, val_l, vocab = data.make_loaders(
      'files', batch_size=4, seq_len=16, train_path=path, val_fraction=0.2,
      token_dtype=dtype if ext == '.bin' else None)
  assert vocab == 1_000
  assert train_l.num_tokens == 4_000 and val_l.num_tokens == 1_000
  assert _is_memmap(train_l.tokens) and _is_memmap(val_l.tokens)
  _check_windows(train_l, train_l.batch(0), train_l.window_starts(0))
  assert val_l.seed == train_l.seed + 1


def test_make_loaders_files_with_val_path(tmp_path):
  np.save(tmp_path / 'train.npy', np.arange(3_000, dtype=np.uint32))
  (np.arange(500, dtype=np.uint16) + 3_000).tofile(tmp_path / 'val.bin')
  with pytest.raises(ValueError, match='uint32'):
    # token_dtype applies to both files and contradicts train.npy's header.
    data.make_loaders('files', batch_size=2, seq_len=8,
                      train_path=tmp_path / 'train.npy',
                      val_path=tmp_path / 'val.bin', token_dtype=np.uint16)
  train_l, val_l, vocab = data.make_loaders(
      'files', batch_size=2, seq_len=8, seed=4, eval_batch_size=5,
      train_path=tmp_path / 'train.npy', val_path=tmp_path / 'val.bin')
  assert vocab == 3_500
  assert train_l.num_tokens == 3_000 and val_l.num_tokens == 500
  assert val_l.batch_size == 5 and val_l.seed == 5
  _, _, vocab = data.make_loaders(
      'files', batch_size=2, seq_len=8, vocab_size=4096,
      train_path=tmp_path / 'train.npy', val_path=tmp_path / 'val.bin')
  assert vocab == 4096


def test_make_loaders_embedded():
  train_l, val_l, vocab = data.make_loaders(batch_size=4, seq_len=64)
  assert vocab == data.VOCAB_BYTES
  total = len(data.embedded_text())
  assert val_l.num_tokens == round(total * 0.1)
  assert train_l.num_tokens + val_l.num_tokens == total
  assert val_l.batch_size == 4 and val_l.seed == 1
  batch = train_l.batch(0)
  assert batch['inputs'].shape == (4, 64)
  next(val_l.eval_batches())


def test_make_loaders_errors(tmp_path):
  with pytest.raises(ValueError, match=r"unknown.*'shakespeare'.*embedded"):
    data.make_loaders('shakespeare', batch_size=2, seq_len=8)
  with pytest.raises(ValueError, match='train_path'):
    data.make_loaders('files', batch_size=2, seq_len=8)
  with pytest.raises(ValueError, match='val_fraction'):
    data.make_loaders(batch_size=2, seq_len=8, val_fraction=1.0)


def test_token_ids_beyond_the_vocabulary_are_named(tmp_path):
  """A vocabulary smaller than the files' ids (or a token_dtype that does
  not match them) stopped the run as a non-finite gradient; it is named
  at the batch that holds such an id, train or validation."""
  tokens = np.arange(600, dtype=np.uint16) % 300
  np.save(tmp_path / 'train.npy', tokens)
  train_l, val_l, vocab = data.make_loaders(
      'files', batch_size=2, seq_len=8, vocab_size=100,
      train_path=tmp_path / 'train.npy', val_fraction=0.5)
  assert vocab == 100
  with pytest.raises(ValueError, match=r'token id 2\d\d \(in the window at '
                     r'offset \d+\) is not below vocab_size=100'):
    for step in range(20):
      train_l.batch(step)
  with pytest.raises(ValueError, match='is not below vocab_size=100'):
    list(val_l.eval_batches())


def test_a_split_too_short_is_named(tmp_path):
  np.save(tmp_path / 'train.npy', np.arange(100, dtype=np.uint16))
  np.save(tmp_path / 'val.npy', np.arange(6, dtype=np.uint16))
  with pytest.raises(ValueError, match=r'^the validation tokens: seq_len=8 '
                     r'needs at least 9 tokens, only 6 available'):
    data.make_loaders('files', batch_size=2, seq_len=8,
                      train_path=tmp_path / 'train.npy',
                      val_path=tmp_path / 'val.npy')


def _write(path, array):
  np.save(path, array)
  return path


@pytest.mark.parametrize('name, make, match', [
    ('tokens.txt', lambda p: p.write_text('1 2 3'), 'extension'),
    ('floats.npy', lambda p: _write(p, np.ones(10, np.float32)), 'float32'),
    ('grid.npy', lambda p: _write(p, np.ones((4, 4), np.uint16)), '1-D'),
    ('signed.npy', lambda p: _write(p, np.ones(10, np.int64)), 'uint16'),
    ('empty.npy', lambda p: _write(p, np.zeros(0, np.uint16)), 'empty'),
    ('empty.bin', lambda p: p.write_bytes(b''), 'empty'),
    ('odd.bin', lambda p: p.write_bytes(b'abc'), 'multiple'),
    ('junk.npy', lambda p: p.write_bytes(b'not numpy'), 'npy'),
    ('missing.npy', lambda p: None, 'does not exist'),
])
def test_load_tokens_errors(tmp_path, name, make, match):
  path = tmp_path / name
  make(path)
  with pytest.raises(ValueError, match=match) as info:
    data.load_tokens(path)
  assert str(path) in str(info.value)


def test_load_tokens_bad_bin_dtype(tmp_path):
  path = tmp_path / 'tokens.bin'
  np.arange(10, dtype=np.uint16).tofile(path)
  with pytest.raises(ValueError, match=r'tokens\.bin.*float32'):
    data.load_tokens(path, dtype=np.float32)
