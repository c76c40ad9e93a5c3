"""Building blocks of ``orthax/configs/*.py``: the full default config, and the
``optimizer`` section of every supported optimizer.

Every key the trainer reads is in :func:`base_config`, with its default;
a config file copies it and changes what differs (configs as data).
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections

from orthax.recipes import registry
from orthax.sharding._distributed import check_comm_dtype
from orthax.train import optim
from orthax.train import partitioning

# Peak learning rates (main branch, AdamW branch) of the one optimizer that
# is not a recipe. A recipe's defaults are in its registry entry
# (``orthax.recipes.default_learning_rates``).
ADAMW_LEARNING_RATES = (3e-3, None)


def learning_rates(name: str) -> tuple[float | None, float | None]:
  """``(main, AdamW branch)`` default peak learning rates of ``name``
  (``'adamw'`` or a registered recipe)."""
  if name == 'adamw':
    return ADAMW_LEARNING_RATES
  if name not in registry.recipe_names():
    raise ValueError(f'unknown optimizer {name!r}; choose one of '
                     f'{list(optimizer_names())}.')
  return registry.default_learning_rates(name)


def optimizer_names() -> tuple[str, ...]:
  """``'adamw'`` and every registered recipe."""
  return ('adamw',) + registry.recipe_names()


class _LearningRates(Mapping):
  """A read-only, live view ``{name: learning_rates(name)}`` over
  :func:`optimizer_names` (recipes registered later included)."""

  def __getitem__(self, name: str) -> tuple[float | None, float | None]:
    if name not in optimizer_names():
      raise KeyError(name)
    return learning_rates(name)

  def __iter__(self) -> Iterator[str]:
    return iter(optimizer_names())

  def __len__(self) -> int:
    return len(optimizer_names())

  def __repr__(self) -> str:
    return f'LEARNING_RATES({dict(self)!r})'


# Peak learning rates for the small byte-level CPU model: (main branch,
# AdamW branch), read from the registry: each recipe's library-mode defaults
# (the learning-rate sweep's; the papers' rates are the reference modes').
LEARNING_RATES: Mapping[str, tuple[float | None, float | None]] = (
    _LearningRates())


def optimizer(name: str, learning_rate: float | None = None,
              adam_learning_rate: float | None = None,
              **kwargs) -> ml_collections.ConfigDict:
  """The ``optimizer`` section for ``name`` (``'adamw'`` or a registered
  recipe); learning rates default to :func:`learning_rates` (for a recipe:
  its registry entry), weight decays to the recipe's own (``None``: NAMO's
  0.4 with 0.1 on its AdamW branch, ARO's 0.2, ...; the trainer's AdamW:
  0)."""
  lr, adam_lr = learning_rates(name)
  lr = lr if learning_rate is None else learning_rate
  if lr is None:
    raise ValueError(f'recipe {name!r} registers no default learning rate; '
                     'pass learning_rate.')
  return ml_collections.ConfigDict({
      'name': name,
      'learning_rate': lr,
      'adam_learning_rate': (adam_lr if adam_learning_rate is None
                             else adam_learning_rate),
      # A recipe's own decays (None): what orthax.<name>() runs with.
      **{key: 0.0 if name == 'adamw' else ml_collections.FieldReference(
          None, field_type=float)
         for key in ('weight_decay', 'adam_weight_decay')},
      'kwargs': ml_collections.ConfigDict(kwargs)})


def follow_optimizer_name(config: ml_collections.ConfigDict,
                          overridden: Iterable[str]) -> None:
  """After ``--config.optimizer.name=X`` on the command line (``overridden``
  holds the dotted keys the command line set), the optimizer section's
  peak rates that the command line did not set become ``X``'s defaults: the
  config file's rates were those of its own optimizer (e.g. Muon's 0.05656,
  19× AdamW's 3e-3). ``--config=lm_cpu:X`` does the same for the whole
  section."""
  overridden = set(overridden)
  if 'optimizer.name' not in overridden:
    return
  lr, adam_lr = learning_rates(config.optimizer.name)
  if 'optimizer.learning_rate' not in overridden:
    config.optimizer.learning_rate = lr
  if 'optimizer.adam_learning_rate' not in overridden:
    config.optimizer.adam_learning_rate = adam_lr


def base_config(optimizer_name: str = 'muon') -> ml_collections.ConfigDict:
  """Every config key with its default (the CPU model on embedded text)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.hardware = 'cpu'  # what the config is sized for (informational)
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=ml_collections.FieldReference(None, field_type=int),
      seq_len=128, d_model=128, num_layers=4,
      num_heads=4, mlp_ratio=4, positions='rope', tie_embeddings=False,
      rope_base=10000.0, dtype='float32', param_dtype='float32',
      remat=False))
  c.data = ml_collections.ConfigDict(dict(
      source='embedded',     # 'embedded' (bytes of Python's docs) | 'files'
      batch_size=16, val_fraction=0.1,
      train_path=ml_collections.FieldReference(None, field_type=str),
      val_path=ml_collections.FieldReference(None, field_type=str),
      token_dtype=ml_collections.FieldReference(None, field_type=str),
      vocab_size=ml_collections.FieldReference(None, field_type=int),
      eval_batch_size=ml_collections.FieldReference(None, field_type=int)))
  c.optimizer = optimizer(optimizer_name)
  c.schedule = ml_collections.ConfigDict(dict(
      kind='cosine', warmup_steps=20, final_fraction=0.1))
  # Axis sizes; comm_dtype: Newton–Schulz all-to-all wire dtype on a mesh.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1,
                                          comm_dtype='bfloat16'))
  c.train = ml_collections.ConfigDict(dict(
      steps=200, log_every=10, eval_every=50,
      eval_batches=ml_collections.FieldReference(8, field_type=int),
      checkpoint_every=0, max_to_keep=2, tensorboard=False,
      # Weights & Biases project (needs wandb); None: off.
      wandb_project=ml_collections.FieldReference(None, field_type=str),
      # Peak FLOP/s of one device for the MFU metric; None: from the
      # device kind (orthax.train.flops), no MFU where unknown (CPUs).
      peak_flops=ml_collections.FieldReference(None, field_type=float),
      # On a step whose gradient has a NaN/Inf (the recipe's guard skips
      # it): 'raise' stops naming the step and leaves; 'skip' logs, counts
      # and stops after max_consecutive_skips skipped steps in a row.
      nonfinite='raise', max_consecutive_skips=10))
  # Dry runs compile at full size unless num_layers scales the depth down.
  c.dry_run = ml_collections.ConfigDict(dict(
      num_layers=ml_collections.FieldReference(None, field_type=int)))
  return c


def pretraining_config(optimizer_name: str, *, hardware: str, model: dict,
                       mesh: dict, batch_size: int, steps: int,
                       warmup_steps: int, adamw_learning_rate: float,
                       data_dir: str = 'data/fineweb10B_gpt2'
                       ) -> ml_collections.ConfigDict:
  """A GPT-2-tokenizer pretraining config on uint16 token files
  (``<data_dir>/train.bin``, ``val.bin``): bf16 activations, remat, linear
  decay to zero. Recipes run at their registered default peak
  (:func:`learning_rates`) with ``adamw_learning_rate`` for their AdamW
  branch; ``'adamw'`` itself
  runs at ``adamw_learning_rate`` with weight decay 0.1."""
  c = base_config(optimizer_name)
  c.hardware = hardware
  c.model.update(vocab_size=50304, dtype='bfloat16', remat=True, **model)
  c.data.update(source='files', batch_size=batch_size, token_dtype='uint16',
                train_path=f'{data_dir}/train.bin',
                val_path=f'{data_dir}/val.bin', vocab_size=50304)
  if optimizer_name == 'adamw':
    c.optimizer.update(learning_rate=adamw_learning_rate, weight_decay=0.1)
  else:
    c.optimizer.update(adam_learning_rate=adamw_learning_rate)
  c.schedule.update(kind='linear', warmup_steps=warmup_steps,
                    final_fraction=0.0)
  c.mesh.update(**mesh)
  c.train.update(steps=steps, log_every=50, eval_every=1000,
                 eval_batches=20, checkpoint_every=1000)
  return c


NONFINITE_POLICIES = ('raise', 'skip')
# Keys the trainer reads that have no default in base_config.
_OPTIONAL_KEYS = {'mesh': ('rules',)}


def _check_keys(prefix: str, given: Mapping[str, Any], known) -> None:
  unknown = sorted(set(given) - set(known))
  if unknown:
    near = difflib.get_close_matches(unknown[0], list(known), n=1)
    raise ValueError(
        f'unknown config key(s) {", ".join(prefix + k for k in unknown)}'
        + (f' (did you mean {prefix}{near[0]}?)' if near else '')
        + f'; {prefix.rstrip(".") or "the config"} has {sorted(known)}.')


def _check_mesh(mesh: Mapping[str, Any]) -> None:
  """Axis sizes (ints ≥ 1), the wire dtype (floating) and ``rules`` (logical
  axis name → a mesh axis, a tuple of them, or ``None``)."""
  partitioning.mesh_shape(mesh)
  check_comm_dtype('mesh.comm_dtype', mesh.get('comm_dtype'))
  rules = mesh.get('rules')
  if rules is None:
    return
  if not isinstance(rules, Mapping):
    raise ValueError('mesh.rules must map logical axis names to mesh axes '
                     f'(e.g. {{"embed": "fsdp"}}), got {rules!r}.')
  for name, axes in rules.items():
    names = axes if isinstance(axes, (tuple, list)) else (axes,)
    if not isinstance(name, str) or any(
        a is not None and a not in partitioning.MESH_AXES for a in names):
      raise ValueError(
          f'mesh.rules[{name!r}] = {axes!r}: a rule maps a logical axis name '
          f'to one of the mesh axes {partitioning.MESH_AXES}, a tuple of '
          'them, or None.')


def _check_int(key: str, value: Any, low: int, optional: bool = False
               ) -> None:
  if value is None and optional:
    return
  if (not isinstance(value, numbers.Integral) or isinstance(value, bool)
      or value < low):
    raise ValueError(f'{key} must be an integer >= {low}'
                     + (' or None' if optional else '')
                     + f', got {value!r}.')


def _check_dtype(key: str, value: Any, kind: type, optional: bool = False
                 ) -> None:
  """``value`` names a dtype of ``kind`` (``jnp.floating``, bfloat16
  included, or ``jnp.integer``)."""
  if value is None and optional:
    return
  try:
    ok = jnp.issubdtype(jnp.dtype(value), kind)
  except TypeError:
    ok = False
  if not ok:
    what = 'a floating-point' if kind is jnp.floating else 'an integer'
    raise ValueError(f'{key} must be {what} dtype name (e.g. '
                     f'{"bfloat16" if kind is jnp.floating else "uint16"})'
                     + (' or None' if optional else '') + f', got {value!r}.')


def _check_positive(key: str, value: Any, optional: bool = False) -> None:
  if value is None and optional:
    return
  if (not isinstance(value, numbers.Real) or isinstance(value, bool)
      or not value > 0 or value == float('inf')):
    raise ValueError(f'{key} must be a positive number'
                     + (' or None' if optional else '') + f', got {value!r}.')


def validate(cfg: Mapping[str, Any]) -> None:
  """Checks a resolved config (a plain nested dict) before anything is
  built: no unknown key in any section (the keys of :func:`base_config`),
  step counts, cadences and batch sizes in range, a known non-finite
  policy, and an ``optimizer`` section its optimizer accepts
  (:func:`orthax.train.optim.validate`). Raises ``ValueError`` naming the
  key."""
  known = base_config('adamw').to_dict()
  _check_keys('', cfg, known)
  for section, keys in known.items():
    if not isinstance(keys, dict) or section == 'optimizer':
      continue
    if section not in cfg and section != 'dry_run':
      raise ValueError(f'the config has no {section!r} section.')
    _check_keys(section + '.', cfg.get(section) or {},
                list(keys) + list(_OPTIONAL_KEYS.get(section, ())))
  if 'optimizer' not in cfg:
    raise ValueError("the config has no 'optimizer' section.")
  tr, data = cfg['train'], cfg['data']
  _check_int('train.steps', tr.get('steps'), 1)
  _check_int('train.log_every', tr.get('log_every', 10), 1)
  for key in ('eval_every', 'checkpoint_every'):
    _check_int(f'train.{key}', tr.get(key), 0, optional=True)
  _check_int('train.eval_batches', tr.get('eval_batches'), 1, optional=True)
  _check_int('train.max_to_keep', tr.get('max_to_keep', 2), 1)
  _check_int('train.max_consecutive_skips',
             tr.get('max_consecutive_skips', 10), 1)
  # 0 was taken as "not given" (the full depth, silently).
  _check_int('dry_run.num_layers', (cfg.get('dry_run') or {}).get(
      'num_layers'), 1, optional=True)
  if tr.get('nonfinite', 'raise') not in NONFINITE_POLICIES:
    raise ValueError(f'train.nonfinite must be one of {NONFINITE_POLICIES}, '
                     f'got {tr.get("nonfinite")!r}.')
  _check_int('data.batch_size', data.get('batch_size'), 1)
  _check_int('data.eval_batch_size', data.get('eval_batch_size'), 1,
             optional=True)
  _check_int('seed', cfg.get('seed'), 0)
  _check_mesh(cfg.get('mesh') or {})
  model = cfg.get('model') or {}
  for key in ('vocab_size', 'seq_len', 'd_model', 'num_layers', 'num_heads',
              'mlp_ratio'):
    if key in model:
      _check_int(f'model.{key}', model[key], 1,
                 optional=key == 'vocab_size')  # None: the data's
  for key in ('dtype', 'param_dtype'):
    if key in model:
      _check_dtype(f'model.{key}', model[key], jnp.floating)
  _check_dtype('data.token_dtype', data.get('token_dtype'), jnp.integer,
               optional=True)
  if 'rope_base' in model:
    _check_positive('model.rope_base', model['rope_base'])
  _check_positive('train.peak_flops', tr.get('peak_flops'), optional=True)
  fraction = data.get('val_fraction', 0.1)
  if (not isinstance(fraction, numbers.Real) or isinstance(fraction, bool)
      or not 0 < fraction < 1):
    raise ValueError(f'data.val_fraction must be in (0, 1), got '
                     f'{fraction!r}.')
  optim.validate(cfg['optimizer'])
