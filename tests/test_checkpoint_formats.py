"""Checkpoints in the optimizer-state layouts older orthax wrote
(:mod:`orthax.train.checkpoint_formats`) restore into today's state."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip('orbax.checkpoint')

from orthax.train import checkpoint  # noqa: E402
from orthax.train import checkpoint_formats  # noqa: E402


def test_a_state_saved_with_optax_named_chain_restores(tmp_path):
  """Checkpoints written before the recipes chained their stages with
  ``orthax.transforms.named_chain`` hold an ``OrderedDict`` where the state
  now has a ``dict``: orbax matches the stages by name, so they restore."""
  import collections  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import orthax  # pylint: disable=g-import-not-at-top
  params = {'w': jnp.arange(128.).reshape(8, 16) / 128, 'b': jnp.zeros(16)}
  tx = orthax.muon()
  _, state = tx.update(jax.tree.map(jnp.cos, params), tx.init(params), params)
  chain = lambda x: isinstance(x, dict) and 'orthogonalize' in x
  old = jax.tree.map(
      lambda x: collections.OrderedDict(x) if chain(x) else x, state,
      is_leaf=chain)
  assert jax.tree.structure(old) != jax.tree.structure(state)
  saver = ocp.StandardCheckpointer()
  saver.save(tmp_path / 'old', old)
  saver.wait_until_finished()
  restored = saver.restore(
      tmp_path / 'old', jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _save_and_restore_intact(tmp_path, saved, like, step=3):
  """Saves ``saved`` (sealed) as ``step`` and restores it with
  ``restore_intact`` into ``like``'s shapes and dtypes: ``(state, step)``."""
  import jax  # pylint: disable=g-import-not-at-top
  ck = checkpoint.Checkpointer(str(tmp_path / 'ck'), 1)
  ck.save(step, saved, force=True)
  ck.seal_if_written()
  ck.close()
  ck = checkpoint.Checkpointer(str(tmp_path / 'ck'), 1)
  try:
    return ck.restore_intact(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like))
  finally:
    ck.close()


def _assert_restores_as_today(tmp_path, old, state):
  """``old`` (a state in an older layout) saved and restored into
  ``state``'s layout gives ``state``, array for array; a state with an
  array more is still refused, naming it."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  restored, step = _save_and_restore_intact(tmp_path, old, state)
  assert step == 3
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ck = checkpoint.Checkpointer(str(tmp_path / 'ck'), 1)
  with pytest.raises(checkpoint.CheckpointMismatchError, match='here only'):
    ck.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                            {**state._asdict(), 'extra': jnp.zeros(2)}))
  ck.close()


def test_a_stage_under_its_former_name_restores(tmp_path):
  """Checkpoints written before the matrix chains' ``'weight_decay'`` stage
  became ``'decoupled_weight_decay'`` (under ``inject_hyperparams`` the old
  name clashed with the hyperparameter) hold it under the old name: it is
  read there, and the hyperparameter of that name stays where it is."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import orthax  # pylint: disable=g-import-not-at-top
  params = {'w': jnp.arange(128.).reshape(8, 16) / 128, 'b': jnp.zeros(16)}
  tx = optax.inject_hyperparams(orthax.muon)(learning_rate=0.02,
                                             weight_decay=0.125)
  state = tx.init(params)
  for k in range(3):
    _, state = tx.update(jax.tree.map(lambda x: jnp.cos(x + k), params),
                         state, params)
  old = checkpoint_formats.under_former_names(state)
  paths = lambda t: {orthax._tree.path_str(p) for p, _ in  # pylint: disable=protected-access
                     jax.tree_util.tree_flatten_with_path(t)[0]}
  gone = paths(state) - paths(old)
  assert gone and all('matrix/inner_state/decoupled_weight_decay/' in p
                      for p in gone), gone
  assert 'hyperparams/weight_decay' in paths(old)
  _assert_restores_as_today(tmp_path, old, state)


def test_a_guard_state_without_the_result_flags_restores(tmp_path):
  """Checkpoints written before the non-finite guard also flagged its
  step's result (``nonfinite_updates``, ``nonfinite_state``) hold its four
  older fields: they are read, and the new flags start False. Together
  with a stage under its former name, as such a checkpoint has both."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import orthax  # pylint: disable=g-import-not-at-top
  params = {'w': jnp.arange(128.).reshape(8, 16) / 128, 'b': jnp.zeros(16)}
  tx = optax.inject_hyperparams(orthax.muon)(learning_rate=0.02)
  state = tx.init(params)
  for k in range(2):
    _, state = tx.update(jax.tree.map(lambda x: jnp.cos(x + k), params),
                         state, params)
  _, skipped = tx.update({'w': params['w'], 'b': params['b'].at[0].set(1e30)},
                         state, params)  # overflows AdamW's v: flags set
  assert orthax.nonfinite_leaves(skipped, result=True)
  old = checkpoint_formats.under_former_names(
      checkpoint_formats.without_added_fields(skipped))
  guard = orthax.nonfinite_status(skipped)
  assert not any('nonfinite_state' in orthax._tree.path_str(p) for p, _ in  # pylint: disable=protected-access
                 jax.tree_util.tree_flatten_with_path(old)[0])
  restored, step = _save_and_restore_intact(tmp_path, old, skipped)
  assert step == 3
  assert jax.tree.structure(restored) == jax.tree.structure(skipped)
  got = orthax.nonfinite_status(restored)
  for a, b in zip(jax.tree.leaves(got.inner_state),
                  jax.tree.leaves(guard.inner_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(got.total) == int(guard.total) == 1
  assert orthax.nonfinite_leaves(restored, result=True) == []
  # The restored state steps on like the saved one.
  g = jax.tree.map(jnp.sin, params)
  for a, b in zip(jax.tree.leaves(tx.update(g, restored, params)[0]),
                  jax.tree.leaves(tx.update(g, skipped, params)[0])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nested_guard_states_without_the_result_flags_restore(tmp_path):
  """``orthax.skip_if_nonfinite(orthax.muon())``: a guard around a recipe's
  own guard. Written by hand in the older four-field layout (not by the
  migration's own function), both levels restore."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import orthax  # pylint: disable=g-import-not-at-top
  params = {'w': jnp.arange(128.).reshape(8, 16) / 128, 'b': jnp.zeros(16)}
  tx = orthax.skip_if_nonfinite(orthax.muon(0.02))
  state = tx.init(params)
  _, state = tx.update(jax.tree.map(jnp.cos, params), state, params)
  old = checkpoint_formats.GuardStateBefore20261206
  inner = state.inner_state
  by_hand = old(old(inner.inner_state, inner.nonfinite, inner.consecutive,
                    inner.total), state.nonfinite, state.consecutive,
                state.total)
  restored, _ = _save_and_restore_intact(tmp_path, by_hand, state, step=1)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_dropped_empty_stage_restores(tmp_path):
  """ROOT's chain held an empty ``'clip_outliers'`` stage until the clip
  moved into ``orthogonalize`` (2026-12-06): the same arrays, one empty
  node more, which orbax refuses as another tree structure. Such a
  checkpoint restores by path; with any array missing it is still refused."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import orthax  # pylint: disable=g-import-not-at-top
  params = {'w': jnp.arange(128.).reshape(8, 16) / 128, 'b': jnp.zeros(16)}
  tx = orthax.root()
  state = tx.init(params)
  for k in range(2):
    _, state = tx.update(jax.tree.map(lambda x: jnp.cos(x + k), params),
                         state, params)
  chain = lambda x: isinstance(x, dict) and 'orthogonalize' in x
  old = jax.tree.map(
      lambda x: ({'momentum': x['momentum'],
                  'clip_outliers': optax.EmptyState(), **x}
                 if chain(x) else x), state, is_leaf=chain)
  assert jax.tree.leaves(old) and jax.tree.structure(old) != (
      jax.tree.structure(state))
  _assert_restores_as_today(tmp_path, old, state)
  # As ROOT wrote it before all three changes of 2026-12-06: the empty
  # stage, the decay stage under its former name, the four-field guard.
  older = checkpoint_formats.under_former_names(
      checkpoint_formats.without_added_fields(old))
  restored, step = _save_and_restore_intact(tmp_path / 'all', older, state)
  assert step == 3
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
