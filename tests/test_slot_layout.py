"""Slot states carry their layout (``SlotState.ids``) and move to another
mesh or device count (:func:`orthax.transforms.relayout_state`; the
trainer's restore: tests/test_train_mesh.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import orthax
from fake_devices import run_cases
from orthax import engine
from orthax.train import checkpoint
from orthax.train import checkpoint_slots
import slot_layout_cases as C


@pytest.fixture(scope='module')
def cases():
  return run_cases('slot_layout_cases.py', timeout=900)


@pytest.mark.parametrize('mesh', list(C.MESHES))
def test_ids_are_where_the_executor_puts_each_matrix(cases, mesh):
  """A stage that keeps the value of the matrix it is handed, on matrices
  filled with their numbers: every slot holds the matrix its id names
  (padding slots nothing), on one device and on meshes with transposed,
  batch-sharded, padded, replicated and two-axis groups."""
  r = cases[f'ids/{mesh}']
  assert r['wrong'] == {}, r['wrong']
  assert r['devices'] == (1 if mesh == 'one' else 8)
  assert [1] in r['transposed'].values() and [0] in r['transposed'].values()
  if mesh in ('fsdp8', 'fsdp4tp2'):
    assert r['padding'] > 0, r   # the padded a2a groups are covered


@pytest.mark.parametrize('recipe,src,dst', C.RELAYOUTS)
def test_a_state_moved_to_another_mesh_steps_as_one_device(cases, recipe, src,
                                                           dst):
  """Two steps on one mesh, the state moved to another, two more there:
  the updates equal four steps on one device (FISMO to eigh's float32
  rounding); from a fresh state instead they do not."""
  r = cases[f'relayout/{recipe}/{src}->{dst}']
  assert r['rel_err'] < 1e-6, r
  assert r['rel_err_state_lost'] > 1e-3, r


def _slot(state):
  return [x for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, engine.SlotState))
          if isinstance(x, engine.SlotState)]


def _params():
  return {'layers': {'kernel': jnp.ones((3, 16, 8))},
          'w': jnp.arange(128.0).reshape(8, 16) / 64, 'b': jnp.ones((8,))}


def test_ids_number_the_matrices_in_order_with_their_orientation():
  """One device: the stacked (3, 16, 8) kernel's matrices are 0, 1, 2, each
  run transposed (16 > 8: odd ids), ``w`` is matrix 3."""
  st = _slot(orthax.aro(learning_rate=0.02).init(_params()))[0]
  ids = {tuple(p): np.asarray(st.ids[k]).tolist()
         for k, (_, p) in zip(sorted(st.slots), st.members)}
  assert ids == {('layers/kernel',): [[1, 3, 5]], ('w',): [[6]]}


def test_relayout_refuses_a_state_of_other_parameters():
  """Each error names the state's path: a rotation of another size, a
  momentum of another shape, a tree of another structure."""
  tx = orthax.aro(learning_rate=0.02)
  state = tx.init(_params())
  wider = tx.init(dict(_params(), w=jnp.ones((16, 32))))
  with pytest.raises(ValueError, match=(
      r"^relayout_state: .*\['aro_rotate'\]\.slots: group1 is saved as "
      r'float32\[\.\.\., \(8, 8\)\] per matrix; here it is '
      r'float32\[\.\.\., \(16, 16\)\]')):
    orthax.transforms.relayout_state(state, wider)
  with pytest.raises(ValueError, match=r'^rotation: group1 is saved as'):
    engine.relayout_slot_state(_slot(state)[0], _slot(wider)[0], 'rotation')
  longer = tx.init(dict(_params(), w=jnp.ones((8, 24))))  # same rotations
  with pytest.raises(ValueError, match=r"^relayout_state: .*mu\['w'\] has "
                     r'shape \(8, 16\), \(8, 24\) here'):
    orthax.transforms.relayout_state(state, longer)
  fewer = tx.init({'w': _params()['w'], 'b': jnp.ones((8,))})
  with pytest.raises(ValueError, match=r'^relayout_state: .*has 9 leaves, 8 here'):
    orthax.transforms.relayout_state(state, fewer)


def test_a_checkpoint_without_ids_is_read_in_this_layout(tmp_path):
  """A checkpoint written before the layout was saved (its slot states
  without ``ids``) restores with this mesh's ids, values unchanged, and is
  recognized as such (the trainer then refuses a mesh change)."""
  tx = orthax.aro(learning_rate=0.02)
  params = _params()
  _, state = tx.update(params, tx.init(params), params)
  is_slot = lambda x: isinstance(x, engine.SlotState)
  old = jax.tree.map(lambda x: engine.SlotState(x.slots, x.axes, x.members)
                     if is_slot(x) else x, state, is_leaf=is_slot)
  ck = checkpoint.Checkpointer(str(tmp_path), every=1)
  ck.save(1, old, force=True)
  ck.close()
  ck = checkpoint.Checkpointer(str(tmp_path), every=1)
  assert checkpoint_slots.saved_without_ids(ck.metadata(1), state)
  layout = checkpoint_slots.slot_states(tx.init(params))
  back = ck.restore(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state), 1, layout)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  assert not checkpoint_slots.saved_without_ids(
      _save_meta(tmp_path / 'new', state), state)


def _save_meta(path, state):
  ck = checkpoint.Checkpointer(str(path), every=1)
  ck.save(1, state, force=True)
  ck.close()
  return checkpoint.Checkpointer(str(path), every=1).metadata(1)
