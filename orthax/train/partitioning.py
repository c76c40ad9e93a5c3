"""The trainer's mesh and the mapping of logical axes onto it.

The mesh has three named axes, always in this order: ``data`` (pure data
parallelism: parameters replicated), ``fsdp`` (data parallelism with
parameters and optimizer state sharded) and ``tensor`` (model dimensions
split, Megatron style). Logical axes of :func:`orthax.train.model.logical_axes`
are mapped onto mesh axes by :data:`DEFAULT_RULES` (with the generic helpers
of :mod:`orthax.flax`); the batch is split over ``data × fsdp``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from orthax import flax as orthax_flax

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# logical axis -> mesh axis (or None: replicated along that axis).
DEFAULT_RULES: dict[str, str | None] = {
    'layers': None,
    'embed': 'fsdp',
    'heads': 'tensor',
    'mlp': 'tensor',
    'vocab': 'tensor',
}


def mesh_shape(mesh_config: Mapping[str, int]) -> tuple[int, int, int]:
  """``(data, fsdp, tensor)`` sizes from a config mapping (missing = 1)."""
  unknown = set(mesh_config) - set(MESH_AXES) - {'rules', 'comm_dtype'}
  if unknown:
    raise ValueError(f'mesh: unknown axes {sorted(unknown)}; the trainer '
                     f'mesh has axes {MESH_AXES}.')
  sizes = tuple(1 if mesh_config.get(a) is None else mesh_config[a]
                for a in MESH_AXES)
  for a, s in zip(MESH_AXES, sizes):
    if isinstance(s, bool) or not isinstance(s, int) or s < 1:
      raise ValueError(f'mesh.{a} must be an int >= 1, got {s!r}.')
  return sizes


def make_mesh(mesh_config: Mapping[str, int],
              devices: Sequence[Any] | None = None,
              axis_type: AxisType = AxisType.Auto) -> Mesh:
  """A ``Mesh`` of ``data × fsdp × tensor`` over the first devices.

  The devices are laid out by :func:`jax.experimental.mesh_utils.create_device_mesh`
  (the axes in order of increasing traffic, ``tensor`` last): on a TPU
  slice along its interconnect's torus, so that each axis's collectives
  run between neighbours; on GPUs by device id; on CPU in the order given.
  Where it cannot lay out the devices it is given (a TPU mesh over part of
  a slice), they keep their order."""
  sizes = mesh_shape(mesh_config)
  need = math.prod(sizes)
  devices = list(jax.devices() if devices is None else devices)
  if len(devices) < need:
    raise ValueError(
        f'mesh {dict(zip(MESH_AXES, sizes))} needs {need} devices, '
        f'{len(devices)} available (for a dry run on CPU set XLA_FLAGS='
        f'--xla_force_host_platform_device_count={need} before JAX starts).')
  if jax.process_count() > 1 and need != len(devices):
    raise ValueError(
        f'mesh {dict(zip(MESH_AXES, sizes))} has {need} devices; on '
        f'{jax.process_count()} processes it must span all {len(devices)} '
        '(a process without a device in it would have no share of the step): '
        f'give mesh sizes whose product is {len(devices)}.')
  chosen = devices[:need]
  try:
    arr = mesh_utils.create_device_mesh(sizes, chosen,
                                        allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    arr = np.asarray(chosen, dtype=object).reshape(sizes)
  return Mesh(arr, MESH_AXES, axis_types=(axis_type,) * 3)


def logical_to_spec(names: Sequence[str | None],
                    rules: Mapping[str, str | None] | None = None) -> P:
  """:func:`orthax.flax.logical_to_spec` with :data:`DEFAULT_RULES` when
  ``rules`` is ``None``."""
  return orthax_flax.logical_to_spec(
      names, DEFAULT_RULES if rules is None else rules)


def param_specs(logical: Any, rules=None) -> Any:
  """:func:`orthax.flax.param_specs` with :data:`DEFAULT_RULES` when
  ``rules`` is ``None``."""
  return orthax_flax.param_specs(
      logical, DEFAULT_RULES if rules is None else rules)


def check_divisible(params: Any, specs: Any,
                    sizes: Mapping[str, int]) -> None:
  """``ValueError`` naming the first parameter whose sharded dimension the
  mesh axis size (``sizes``: axis name → size) does not divide."""
  sizes = dict(sizes)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, x), spec in zip(flat, orthax_flax.spec_per_param(params, specs)):
    for dim, ax in zip(x.shape, tuple(spec)):
      size = math.prod(sizes[a] for a in (
          () if ax is None else ax if isinstance(ax, tuple) else (ax,)))
      if dim % size:
        name = '/'.join(str(getattr(k, 'key', k)) for k in path)
        raise ValueError(
            f'parameter {name!r} of shape {tuple(x.shape)}: dimension {dim} '
            f'is sharded over mesh axis {ax!r} of size {size}, which '
            'does not divide it; change the model size or the mesh.')


def check_batch(batch_size: int, sizes: Mapping[str, int],
                what: str = 'data.batch_size'):
  """``ValueError`` unless the batch splits evenly over ``data × fsdp``."""
  shards = math.prod(sizes[a] for a in BATCH_AXES)
  if batch_size % shards:
    raise ValueError(f'{what}={batch_size} is not divisible by the '
                     f'data × fsdp mesh size {shards} ({dict(sizes)}).')


def shardings(specs: Any, mesh: Mesh) -> Any:
  """``NamedSharding`` tree from a ``PartitionSpec`` tree."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a ``[batch, seq]`` token array."""
  return NamedSharding(mesh, P(BATCH_AXES, None))
