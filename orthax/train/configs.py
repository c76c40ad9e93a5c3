"""Building blocks of ``configs/*.py``: the full default config, and the
``optimizer`` section of every supported optimizer.

Every key the trainer reads is in :func:`base_config`, with its default;
a config file copies it and changes what differs (configs as data).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import ml_collections

from orthax.recipes import registry

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
# AdamW branch), read from the registry. The orthogonalized recipes use
# their papers' defaults.
LEARNING_RATES: Mapping[str, tuple[float | None, float | None]] = (
    _LearningRates())


def optimizer(name: str, learning_rate: float | None = None,
              adam_learning_rate: float | None = None,
              **kwargs) -> ml_collections.ConfigDict:
  """The ``optimizer`` section for ``name`` (``'adamw'`` or a registered
  recipe); learning rates default to :func:`learning_rates` (for a recipe:
  its registry entry)."""
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
      'weight_decay': 0.0, 'adam_weight_decay': 0.0,
      'kwargs': ml_collections.ConfigDict(kwargs)})


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
      checkpoint_every=0, max_to_keep=2, tensorboard=False))
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
  decay to zero. Recipes run at their default peak (0.02 for the matrices)
  with ``adamw_learning_rate`` for their AdamW branch; ``'adamw'`` itself
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
