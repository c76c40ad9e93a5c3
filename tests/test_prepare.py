"""orthax-prepare-data: text files → token files with a Hugging Face
tokenizer, offline on the embedded corpus, end to end into the trainer."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from orthax.train import configs
from orthax.train import data
from orthax.train import prepare
from orthax.train import trainer


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """The embedded corpus as two text files (the second one short)."""
  d = tmp_path_factory.mktemp('text')
  text = data.embedded_text().decode('utf-8')
  cut = len(text) - 20000
  (d / 'a.txt').write_text(text[:cut], encoding='utf-8')
  (d / 'b.txt').write_text(text[cut:], encoding='utf-8')
  return d, text


@pytest.fixture(scope='module')
def prepared(corpus, tmp_path_factory):
  d, _ = corpus
  out = tmp_path_factory.mktemp('prepared')
  meta = prepare.prepare([d / 'a.txt', d / 'b.txt'], str(out),
                         vocab_size=512, val_fraction=0.05)
  return out, meta


def test_token_files_decode_back_to_the_text(corpus, prepared):
  _, text = corpus
  out, meta = prepared
  train, val = np.load(out / 'train.npy'), np.load(out / 'val.npy')
  assert train.dtype == val.dtype == np.uint16 and meta['dtype'] == 'uint16'
  assert meta['vocab_size'] == 512
  assert (meta['train_tokens'], meta['val_tokens']) == (train.size, val.size)
  assert val.size == round(0.05 * (train.size + val.size))
  # A BPE tokenizer compresses: far fewer tokens than bytes.
  assert train.size + val.size < 0.6 * len(text.encode())
  tok = prepare.load_tokenizer(str(out / 'tokenizer.json'))
  eot = tok.token_to_id(prepare.END_OF_TEXT)
  ids = np.concatenate([train, val]).tolist()
  # Each file ends with the end-of-text token; between them, the files.
  assert ids.count(eot) == 2 and ids[-1] == eot
  first = ids.index(eot)
  assert tok.decode(ids[:first]) + tok.decode(ids[first + 1:-1]) == text


def test_given_tokenizer_via_the_command_from_another_directory(
    corpus, prepared, tmp_path):
  d, _ = corpus
  out, meta = prepared
  proc = subprocess.run(
      [sys.executable, '-c', 'from orthax.cli import prepare_data; '
       'prepare_data.run()', f'--input={d}/*.txt',
       f'--tokenizer={out}/tokenizer.json', '--out=again dir',
       '--val_fraction=0.05'], cwd=tmp_path, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  again = tmp_path / 'again dir'
  assert ("orthax-train --config=lm_cpu --flagfile='"
          f"{again / 'flags.txt'}'") in proc.stdout
  assert ("orthax-train --config=lm_cpu --config.data.source=files "
          f"'--config.data.train_path={again / 'train.npy'}'") in proc.stdout
  # The same tokenizer on the same files (a.txt, b.txt by the sorted glob).
  np.testing.assert_array_equal(np.load(again / 'train.npy'),
                                np.load(out / 'train.npy'))
  m = json.loads((again / 'meta.json').read_text())
  assert m['tokenizer'] == str(out / 'tokenizer.json')
  lines = (again / 'flags.txt').read_text().splitlines()
  assert lines[0].startswith('#') and lines[1:] == m['flags']
  # The flag file trains, its paths with a space in them and all.
  proc = subprocess.run(
      [sys.executable, '-c', 'from orthax.cli import train; train.run()',
       '--config=lm_cpu:muon', f"--flagfile={again / 'flags.txt'}",
       '--config.model.d_model=32', '--config.model.num_layers=1',
       '--config.train.steps=2', '--config.train.eval_every=2',
       '--config.train.eval_batches=1', '--config.schedule.warmup_steps=0'],
      cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout[proc.stdout.index('{'):])
  assert summary['steps'] == 2 and math.isfinite(summary['final_val_loss'])


def test_trains_on_the_prepared_files(prepared):
  out, meta = prepared
  cfg = configs.base_config('muon')
  cfg.data.source = 'files'
  cfg.data.train_path = str(out / 'train.npy')
  cfg.data.val_path = str(out / 'val.npy')
  cfg.data.vocab_size = meta['vocab_size']
  cfg.model.d_model, cfg.model.num_layers = 32, 1
  cfg.train.steps, cfg.train.eval_every, cfg.train.log_every = 4, 4, 1
  cfg.train.eval_batches = 2
  cfg.schedule.warmup_steps = 0
  res = trainer.train(cfg, progress=False)
  losses = [r['loss'] for r in res['train']]
  assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
  # Starts near uniform over the 512 ids.
  assert abs(losses[0] - math.log(512)) < 0.5
  assert math.isfinite(res['summary']['final_val_loss'])


def test_bad_inputs_are_named(corpus, tmp_path):
  d, _ = corpus
  with pytest.raises(ValueError, match="input '.*nope.txt': no such file"):
    prepare.prepare([str(d / 'a.txt'), str(d / 'nope.txt')], str(tmp_path))
  binary = tmp_path / 'x.bin'
  binary.write_bytes(b'\xff\xfe\x00\x81' * 100)
  with pytest.raises(ValueError, match="x.bin' is not UTF-8 text"):
    prepare.prepare([binary], str(tmp_path / 'o'))
  bad = tmp_path / 'tok.json'
  bad.write_text('{"not": "a tokenizer"}')
  with pytest.raises(ValueError, match="tok.json' is not a tokenizers JSON"):
    prepare.prepare([d / 'b.txt'], str(tmp_path / 'o'), tokenizer=str(bad))
  with pytest.raises(ValueError, match='val_fraction must be in'):
    prepare.prepare([d / 'b.txt'], str(tmp_path / 'o'), val_fraction=1.0)
  with pytest.raises(ValueError, match='vocab_size must be at least 257'):
    prepare.prepare([d / 'b.txt'], str(tmp_path / 'o'), vocab_size=100)
  tiny = tmp_path / 'tiny.txt'
  tiny.write_text('hi')
  with pytest.raises(ValueError, match='cannot be split'):
    prepare.prepare([tiny], str(tmp_path / 'o'), vocab_size=300)
  assert not os.path.exists(tmp_path / 'o' / 'train.npy')


def test_meta_names_the_separator_only_when_the_tokenizer_has_it(
    corpus, prepared, tmp_path):
  """A tokenizer without ``<|endoftext|>`` joins the files without a
  separator; meta.json said it used one."""
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  d, _ = corpus
  _, meta = prepared
  assert meta['end_of_text'] == prepare.END_OF_TEXT
  words = Tokenizer(models.WordLevel({'[UNK]': 0, 'the': 1, 'a': 2},
                                     unk_token='[UNK]'))
  words.pre_tokenizer = pre_tokenizers.Whitespace()
  words.save(str(tmp_path / 'words.json'))
  m = prepare.prepare([d / 'a.txt', d / 'b.txt'], str(tmp_path / 'o'),
                      tokenizer=str(tmp_path / 'words.json'))
  assert m['end_of_text'] is None
  assert json.loads((tmp_path / 'o' / 'meta.json').read_text())[
      'end_of_text'] is None
