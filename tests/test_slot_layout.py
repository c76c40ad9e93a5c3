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


def test_a_replicated_state_steps_on_an_explicit_mesh(cases):
  r = cases['replicated_state']
  assert r == {'muon': 0.0, 'aro': 0.0}, r


def _slot(state):
  return [x for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, engine.SlotState))
          if isinstance(x, engine.SlotState)]


def _params():
  rng = np.random.default_rng(0)
  return {'layers': {'kernel': jnp.asarray(rng.standard_normal((3, 16, 8)),
                                           jnp.float32)},
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


def _stepped(tx, params, steps=1):
  state = tx.init(params)
  for _ in range(steps):
    _, state = tx.update(params, state, params)
  return state


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _without_ids(state):
  is_slot = lambda x: isinstance(x, engine.SlotState)
  return jax.tree.map(lambda x: engine.SlotState(x.slots, x.axes, x.members)
                      if is_slot(x) else x, state, is_leaf=is_slot)


def test_a_checkpoint_without_ids_is_read_in_this_layout(tmp_path):
  """A checkpoint written before the layout was saved (its slot states
  without ``ids``) restores with this mesh's ids, values unchanged; told
  that the mesh changed, it is refused, naming the step."""
  tx = orthax.aro(learning_rate=0.02)
  params = _params()
  state = _stepped(tx, params)
  ck = checkpoint.Checkpointer(str(tmp_path), every=1)
  ck.save(1, _without_ids(state), force=True)
  ck.close()
  ck = checkpoint.Checkpointer(str(tmp_path), every=1)
  layout = checkpoint_slots.slot_states(tx.init(params))
  back = ck.restore(_abstract(state), 1, layout)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(checkpoint_slots.UnknownLayoutError, match=(
      r'^checkpoint step 1 in .* was saved on another mesh \(mesh.fsdp: 8 -> '
      r'1 changed\) by an orthax that did not record')):
    ck.restore(_abstract(state), 1, layout, ['mesh.fsdp: 8 -> 1'])


def test_a_fallback_to_a_checkpoint_without_ids_is_refused_too(tmp_path):
  """Step 1 without ids, step 2 with them: with step 2 damaged, the
  fallback to step 1 across a mesh change is refused (deciding by the
  newest step alone let it through, each matrix reading another's
  state)."""
  tx = orthax.aro(learning_rate=0.02)
  params = _params()
  ck = checkpoint.Checkpointer(str(tmp_path), every=1)
  ck.save(1, _without_ids(_stepped(tx, params, 1)), force=True)
  ck.seal_if_written()
  ck.save(2, _stepped(tx, params, 2), force=True)
  ck.close()
  ck = checkpoint.Checkpointer(str(tmp_path), every=1)
  layout = checkpoint_slots.slot_states(tx.init(params))
  state = _stepped(tx, params, 2)
  damaged = [f for f in (tmp_path / '2').rglob('*') if f.is_file()
             and f.name != checkpoint.CHECKSUMS]
  damaged[0].write_bytes(b'x' + damaged[0].read_bytes()[1:] + b'x')
  with pytest.raises(checkpoint_slots.UnknownLayoutError,
                     match=r'^checkpoint step 1 in '):
    ck.restore_intact(_abstract(state), layout, ['mesh.fsdp: 8 -> 1'])


def test_relayout_moves_each_matrix_to_the_slot_its_id_names():
  """One device, a target whose ids name the stacked kernel's three
  matrices in another order: each slot gets that matrix's state (numpy
  gather by id), padding (-1) keeps the target's own; an optax state and
  an nnx.Optimizer's opt_state (arrays inside nnx Variables) alike."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  tx = orthax.aro(learning_rate=0.02)
  params = _params()
  state = _stepped(tx, params, 2)
  saved = _slot(state)[0]
  like = _slot(tx.init(params))[0]
  perm = np.array([[5, -1, 1]])    # matrix 2, padding, matrix 0
  moved = engine.relayout_slot_state(saved, engine.SlotState(
      like.slots, like.axes, like.members, dict(like.ids, group0=perm)))
  old, new = np.asarray(saved.slots['group0']), np.asarray(
      moved.slots['group0'])
  np.testing.assert_array_equal(new[0, 0], old[0, 2])
  np.testing.assert_array_equal(new[0, 1], np.asarray(like.slots['group0'])[0, 1])
  np.testing.assert_array_equal(new[0, 2], old[0, 0])
  assert not np.array_equal(old[0, 0], old[0, 2])
  np.testing.assert_array_equal(moved.ids['group0'], perm)

  class Net(nnx.Module):

    def __init__(self):
      self.w = nnx.Param(params['w'])
      self.layers = nnx.Param(params['layers']['kernel'])

  def optimizer():
    return nnx.Optimizer(Net(), orthax.aro(learning_rate=0.02,
                                           router=orthax.Router(extra_rules=[
                                               orthax.Rule('layers',
                                                           'matrix')])),
                         wrt=nnx.Param)

  opt, fresh = optimizer(), optimizer()
  grads = nnx.state(Net(), nnx.Param)
  opt.update(Net(), grads)
  slot, fresh_slot = _slot(opt.opt_state)[0], _slot(fresh.opt_state)[0]
  ids = dict(jax.tree.map(np.asarray, fresh_slot.ids))
  key = next(k for k, v in ids.items() if v.size == 3)
  ids[key] = np.asarray(ids[key])[:, ::-1].copy()
  moved = engine.relayout_slot_state(slot, engine.SlotState(
      fresh_slot.slots, fresh_slot.axes, fresh_slot.members, ids))
  a = np.asarray(jax.tree.leaves(slot.slots[key])[0])
  b = np.asarray(jax.tree.leaves(moved.slots[key])[0])
  np.testing.assert_array_equal(b[0, ::-1], a[0])
  back = orthax.transforms.relayout_state(opt.opt_state, fresh.opt_state)
  fresh.opt_state = back
  fresh.update(Net(), grads)   # steps with the moved state
  with pytest.raises(ValueError, match='^relayout_state: got an nnx.State'):
    orthax.transforms.relayout_state(nnx.state(opt), nnx.state(fresh))


def _save_meta(path, state):
  ck = checkpoint.Checkpointer(str(path), every=1)
  ck.save(1, state, force=True)
  ck.close()
  return checkpoint.Checkpointer(str(path), every=1).metadata(1)


def test_flax_keeps_every_saved_group_and_abstract_targets_are_refused():
  """flax.serialization read a slot state by the target's group keys: one
  saved on a mesh with more groups lost some (then relayout blamed the
  parameters); the saved groups are all read now. An abstract ``like``
  (jax.eval_shape) is refused by name."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  tx = orthax.aro(learning_rate=0.02)
  params = _params()
  saved = _slot(_stepped(tx, params, 1))[0]
  one = engine.SlotState({'group0': saved.slots['group0']}, saved.axes,
                         saved.members[:1], {'group0': saved.ids['group0']})
  back = serialization.from_state_dict(one,
                                       serialization.to_state_dict(saved))
  assert sorted(back.slots) == sorted(back.ids) == ['group0', 'group1']
  for k in saved.slots:
    np.testing.assert_array_equal(back.slots[k], saved.slots[k])
  like = jax.eval_shape(tx.init, params)
  with pytest.raises(ValueError, match=r'must be concrete, tx.init\(params\)'):
    orthax.transforms.relayout_state(_stepped(tx, params, 1), like)
