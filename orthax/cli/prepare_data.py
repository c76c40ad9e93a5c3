"""``orthax-prepare-data``: tokenize text files into the trainer's token
files with a Hugging Face ``tokenizers`` tokenizer.

    orthax-prepare-data --input='texts/*.txt' --vocab_size=4096 --out=data
    orthax-prepare-data --input=a.txt,b.txt --tokenizer=tokenizer.json --out=data
    orthax-train --config=lm_cpu:muon --flagfile=data/flags.txt

Writes ``<out>/train.npy``, ``<out>/val.npy``, ``<out>/tokenizer.json``,
``<out>/meta.json`` and ``<out>/flags.txt`` (the ``--config.data.*`` flags
that train on them, as an absl flag file: one flag per line); see :mod:`orthax.train.prepare`.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import types
from typing import Sequence

from orthax import cli


def define_flags() -> types.SimpleNamespace:
  from absl import flags  # pylint: disable=g-import-not-at-top
  return types.SimpleNamespace(
      input=flags.DEFINE_list('input', None, 'Text files or globs (UTF-8), '
                              'comma-separated, in order.'),
      out=flags.DEFINE_string('out', 'data', 'Output directory.'),
      tokenizer=flags.DEFINE_string(
          'tokenizer', None, 'A tokenizers JSON file (e.g. GPT-2\'s); '
          'default: train a byte-level BPE tokenizer on the input.'),
      vocab_size=flags.DEFINE_integer(
          'vocab_size', 4096, 'Size of the trained tokenizer.'),
      val_fraction=flags.DEFINE_float(
          'val_fraction', 0.01, 'Share of tokens (the last) held out.'))


def expand(patterns: Sequence[str]) -> list[str]:
  """Files of ``patterns`` (globs sorted; a pattern matching nothing is
  kept, so that :func:`orthax.train.prepare.prepare` names it)."""
  out = []
  for p in patterns:
    out.extend(sorted(glob.glob(p)) or [p])
  return out


def main(f: types.SimpleNamespace) -> None:
  from orthax.train import prepare  # pylint: disable=g-import-not-at-top
  if not f.input.value:
    raise ValueError('--input is required: the text files to tokenize.')
  try:
    meta = prepare.prepare(expand(f.input.value),
                           cli.output_dir('out', f.out.value),
                           tokenizer=f.tokenizer.value,
                           vocab_size=f.vocab_size.value,
                           val_fraction=f.val_fraction.value)
  except ImportError as e:  # the data extra: a setup error, said as one line
    raise ValueError(str(e)) from None
  print(json.dumps({k: v for k, v in meta.items() if k != 'flags'},
                   indent=1))
  flag_file = os.path.abspath(os.path.join(f.out.value, 'flags.txt'))
  print('train on it with:\n  orthax-train --config=lm_cpu --flagfile='
        f'{shlex.quote(flag_file)}\nwhich is:\n  orthax-train '
        '--config=lm_cpu ' + ' '.join(shlex.quote(x) for x in meta['flags']))


def run(argv: Sequence[str] | None = None) -> None:
  cli.run_app('orthax-prepare-data', __doc__, define_flags, main, argv)
