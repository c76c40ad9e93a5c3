"""Distributing Newton–Schulz over a device mesh (docs/distributed.md).

Each device gets whole matrices: per group of same-shape matrices a static
:class:`Plan` picks ``local`` (matrix dimensions unsharded, zero
collectives), ``a2a`` (one fused ``all_to_all`` in and one out over all the
matrix's sharding axes) or ``replicated`` (each device 1/G of the stack, then
``all_gather``) — or, for a matrix too large for one device, ``gram``
(tensor-parallel Newton–Schulz on column blocks, one ``psum`` of the ``m×m``
Gram matrix per product) — and :func:`distributed_orthogonalize` runs it
inside ``jax.shard_map``. The result comes back in the parameters' sharding.
:func:`plan` shows an optimizer's plan ahead of time, without devices.
"""

from orthax.sharding._execute import distributed_orthogonalize
from orthax.sharding._execute import execute_plan
from orthax.sharding._execute import group_key
from orthax.sharding._execute import local_plan
from orthax.sharding._execute import orthogonalize_tree
from orthax.sharding._execute import place
from orthax.sharding._execute import plan_leaves
from orthax.sharding._execute import stack_plan
from orthax.sharding._group import run_group
from orthax.sharding._group import slot_count
from orthax.sharding._inspect import NotDistributedError
from orthax.sharding._inspect import plan
from orthax.sharding._distributed import STRATEGIES
from orthax.sharding._distributed import Distributed
from orthax.sharding._plan_types import GroupPlan
from orthax.sharding._plan_types import LeafInfo
from orthax.sharding._plan_types import Plan
from orthax.sharding._cost import default_matrix_flops
from orthax.sharding._plan import plan_orthogonalize
from orthax.sharding._specs import spec_entries
from orthax.sharding._specs import array_spec
from orthax.sharding._specs import as_spec
from orthax.sharding._specs import check_meshes
from orthax.sharding._specs import check_specs
from orthax.sharding._specs import explicit_spec
from orthax.sharding._specs import leaf_specs
from orthax.sharding._specs import specs_for
from orthax.sharding._state_specs import stage_state_spec
from orthax.sharding._state_specs import takes_column_blocks

__all__ = [
    'Distributed', 'GroupPlan', 'LeafInfo', 'NotDistributedError', 'Plan',
    'STRATEGIES', 'array_spec', 'as_spec', 'check_meshes', 'check_specs',
    'default_matrix_flops', 'distributed_orthogonalize', 'execute_plan',
    'explicit_spec', 'group_key', 'leaf_specs', 'local_plan',
    'orthogonalize_tree', 'place', 'plan', 'plan_leaves', 'plan_orthogonalize',
    'run_group', 'slot_count', 'spec_entries', 'specs_for', 'stack_plan',
    'stage_state_spec', 'takes_column_blocks',
]
