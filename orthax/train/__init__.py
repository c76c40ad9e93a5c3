"""The reference trainer: a Flax NNX GPT trained with orthax recipes.

Library code that ``scripts/train.py``, ``scripts/compare.py`` and the
notebooks import (needs the ``scripts`` extra: flax, orbax, ml_collections):

* :mod:`~orthax.train.data` — the embedded corpus and token files;
* :mod:`~orthax.train.model` — the GPT, its logical axes;
* :mod:`~orthax.train.partitioning` — the ``data × fsdp × tensor`` mesh;
* :mod:`~orthax.train.optim` — schedules and the optimizer from a config,
  and the sharding plan of a config (:func:`plan`);
* :mod:`~orthax.train.step` — jitted train/eval steps and state shardings;
* :mod:`~orthax.train.trainer` — the loop (:func:`train`);
* :mod:`~orthax.train.faults` — non-finite gradient policy, SIGTERM;
* :mod:`~orthax.train.checkpoint` — verified checkpoints, fallback;
* :mod:`~orthax.train.rundir` — ``config.json``, refused reruns;
* :mod:`~orthax.train.metrics`;
* :mod:`~orthax.train.dry_run` — compile a config on a fake mesh;
* :mod:`~orthax.train.compare` — several optimizers on one config;
* :mod:`~orthax.train.sweep` — a resumable learning-rate sweep;
* :mod:`~orthax.train.reference_modes` — the ``reference=`` modes at their
  references' rates;
* :mod:`~orthax.train.configs` — defaults that ``orthax/configs/*.py`` build on,
  and the config check.
"""

from orthax import _extras

if (_missing := _extras.missing_module()) is not None:
  raise ModuleNotFoundError(
      _extras.scripts_extra_message('orthax.train', _missing), name=_missing)

# pylint: disable=g-import-not-at-top,wrong-import-position
from orthax.train.optim import plan
from orthax.train.trainer import build
from orthax.train.trainer import train

__all__ = ['build', 'plan', 'train']
