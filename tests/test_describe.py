"""What :func:`orthax.describe` prints for a recipe: each leaf's branch,
learning rate and weight decay (the ones its step applies), and the notes
under the table."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
from orthax.recipes import _common


def _rows(table):
  """The table rows of a describe output (not its header or notes)."""
  return [line for line in table.splitlines()[2:]
          if not line.startswith('note: ')]


def _rates_and_decays(table):
  """``{path: (lr, wd)}`` from a describe table (its last two columns)."""
  return {line.split()[0]: tuple(line.split()[-2:])
          for line in _rows(table)}


def test_describe_shows_branch_learning_rates_and_decays(capsys):
  params = {'embed': jnp.zeros((50, 8)), 'w': jnp.zeros((8, 8)),
            'b': jnp.zeros(8)}
  table = orthax.describe(params, optimizer=orthax.muon())
  assert table.splitlines()[0].split()[-2:] == ['lr', 'wd']
  # The library mode decays matrices by 0.2 and leaves the AdamW branch.
  assert _rates_and_decays(table) == {
      'b': ('0.003', '0'), 'embed': ('0.003', '0'), 'w': ('0.05656', '0.2')}
  assert capsys.readouterr().out.strip() == table
  table = orthax.describe(params, optimizer=orthax.muon(
      optax.constant_schedule(0.02), adam_learning_rate=1e-3,
      weight_decay=0.3, adam_weight_decay=0.05))
  assert list(_rates_and_decays(table).values()) == [
      ('0.001', '0.05'), ('0.001', '0.05'), ('schedule', '0.3')]
  # Moonlight's mode decays both branches by its 0.1.
  table = orthax.describe(params, optimizer=orthax.muon(
      reference='moonlight'))
  assert {wd for _, wd in _rates_and_decays(table).values()} == {'0.1'}
  table = orthax.describe(params, optimizer=orthax.spectra(
      1e-3, weight_decay=0.02))
  assert set(_rates_and_decays(table).values()) == {('0.001', '0.02')}


@pytest.mark.parametrize('name', orthax.recipe_names())
def test_describe_decays_are_the_ones_applied(name):
  """Each branch's reported λ is the one its step applies: the recipe at
  its defaults steps exactly as with that λ passed explicitly, and unlike
  with another λ (a decay reported wrongly fails here)."""
  params = {'w': jnp.ones((8, 8)), 'b': jnp.ones(8)}
  grads = {'w': jax.random.normal(jax.random.key(0), (8, 8)),
           'b': jax.random.normal(jax.random.key(1), (8,))}
  decays = _common.recipe_routing(orthax.recipe(name)).weight_decays
  accepted = inspect.signature(orthax.recipe_factory(name)).parameters
  checks = [('w', 'matrix', 'weight_decay')]
  if 'adam_weight_decay' in accepted:
    checks.append(('b', 'adam', 'adam_weight_decay'))

  def step(**kwargs):
    tx = orthax.recipe(name, **kwargs)
    return tx.update(grads, tx.init(params), params)[0]

  default = step()
  for leaf, label, key in checks:
    same = step(**{key: decays[label]})
    other = step(**{key: decays[label] + 0.05})
    np.testing.assert_array_equal(default[leaf], same[leaf],
                                  err_msg=f'{name} {label}')
    assert not np.allclose(default[leaf], other[leaf]), (name, label)


ADAPTIVE_RATES = {'namo': 'min(α·c·k, 1)', 'namo_d': 'per input feature',
                  'lanton': 'η_ℓ', 'dct_adamw': 'c = 1/max(min(fan_in, fan_out), 128)'}


@pytest.mark.parametrize('name', orthax.recipe_names())
def test_describe_notes_where_the_step_scales_its_rates(name, capsys):
  """NAMO, NAMO-D and LANTON scale their matrix rate (and decay) each step
  by a noise-adaptive factor, DCT-AdamW by the matrix's smaller side: the
  table's lr and wd are base values there, and a note under the table says
  how they are used; nowhere else (DCT-AdamW's scale='none': no note)."""
  params = {'w': jnp.ones((8, 8)), 'b': jnp.ones(8)}
  notes = [line for line in orthax.describe(
      params, optimizer=orthax.recipe(name)).splitlines()
           if line.startswith('note: ')]
  capsys.readouterr()
  if name in ADAPTIVE_RATES:
    assert len(notes) == 1 and notes[0].startswith(f"note: {name}'s matrix lr")
    assert ADAPTIVE_RATES[name] in notes[0], notes
  else:
    assert notes == []
  if name == 'dct_adamw':
    assert not [line for line in orthax.describe(
        params, optimizer=orthax.dct_adamw(scale='none')).splitlines()
                if line.startswith('note: ')]


def test_describe_refuses_what_it_cannot_read():
  params = {'w': jnp.zeros((8, 8))}
  with pytest.raises(ValueError, match='not a plain optax'):
    orthax.describe(params, optimizer=optax.adamw(1e-3))
  with pytest.raises(ValueError, match='inject_hyperparams'):
    orthax.describe(params, optimizer=optax.inject_hyperparams(orthax.muon)(
        learning_rate=0.02))
  by_callable = orthax.muon(0.02, router=lambda p: orthax.Router().labels(p))
  # Its own labels (test_a_recipe_routed_by_a_labels_callable_...), or
  # with a router given, the router's.
  assert _rows(orthax.describe(params, optimizer=by_callable))[0].split()[
      3:] == ['matrix', '1', 'x', '8', 'x', '8', '0.02', '0.2']
  table = orthax.describe(params, orthax.Router(), optimizer=by_callable)
  assert table.splitlines()[2].split()[-2:] == ['0.02', '0.2']
  # A recipe in the router's place is the optimizer (it raised an
  # AttributeError); anything else there is named.
  assert orthax.describe(params, orthax.muon(0.02)) == orthax.describe(
      params, optimizer=orthax.muon(0.02))
  with pytest.raises(TypeError, match='router must be an orthax.Router, '
                     'got dict'):
    orthax.describe(params, {'w': 'matrix'})
  with pytest.raises(TypeError, match='optimizer= is given too'):
    orthax.describe(params, orthax.muon(), optimizer=orthax.muon())


@pytest.mark.parametrize('name', orthax.recipe_names())
def test_describe_reads_every_recipe_with_its_default_router(name):
  """Each leaf gets its branch's rate (no recipe routes by a bare labels
  callable by default)."""
  params = {'embed': jnp.zeros((50, 8)), 'w': jnp.zeros((8, 8)),
            'b': jnp.zeros(8)}
  tx = orthax.recipe(name)
  rates = _common.recipe_routing(tx).learning_rates
  table = orthax.describe(params, optimizer=tx)
  lines = _rows(table)
  assert len(lines) == 3 and all(
      '?' not in line.split()[-2:] for line in lines), (name, table)
  w_row = next(line for line in lines if line.startswith('w '))
  assert ('matrix' in w_row.split()) == ('matrix' in rates), (name, table)


@pytest.mark.parametrize('reference, embed, decay', [
    ('orthax', 'adam', '0.4'), ('paper', 'signum', '0')])
def test_describe_reads_lanton_branches(reference, embed, decay):
  """The paper's mode steps the embedding by Signum, the library's by AdamW;
  both at the AdamW branch's rate, 3e-3 per 0.08 of η, undecayed; the
  matrices at the mode's λ."""
  params = {'embed': jnp.zeros((50, 8)), 'w': jnp.zeros((8, 8)),
            'b': jnp.zeros(8)}
  table = orthax.describe(params, optimizer=orthax.lanton(
      0.04, reference=reference))
  labels = ('adam', 'signum', 'matrix')
  rows = {t[0]: (next(x for x in t if x in labels), *t[-2:])
          for t in (line.split() for line in _rows(table))}
  assert rows == {'b': ('adam', '0.0015', '0'),
                  'embed': (embed, '0.0015', '0'),
                  'w': ('matrix', '0.04', decay)}


# --- output layers routed to the matrix branch ------------------------------


def test_a_recipe_routed_by_a_labels_callable_shows_its_own_labels():
  """muon(reference='optax') routes by optax's rule (2-D leaves are
  matrices): describe refused it and pointed to router=orthax.Router(),
  whose table sent the embedding to AdamW while the optimizer
  orthogonalized it."""
  params = {'embed': {'embedding': jnp.zeros((50, 16))},
            'mlp': {'kernel': jnp.zeros((16, 32))}, 'b': jnp.zeros(4)}
  tx = orthax.muon(reference='optax')
  rows = {line.split()[0]: line.split()
          for line in _rows(orthax.describe(params, optimizer=tx))}
  assert rows['embed/embedding'][3:7] == ['matrix', '1', 'x', '50']
  assert rows['b'][2] == 'adam'
  g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(0), p.shape),
                   params)
  u, _ = tx.update(g, tx.init(params), params)
  s = np.linalg.svd(np.asarray(u['embed']['embedding'], np.float64),
                    compute_uv=False)
  # Orthogonalized (Newton–Schulz's spread, about 0.7–1.1), as the table
  # says; AdamW's first step, ±lr, spreads (√50 + 4)/(√50 − 4) ≈ 3.6.
  assert s.max() / s.min() < 2


def test_normuon_modded_notes_its_decay():
  p = {'w': jnp.ones((16, 32))}
  g = {'w': jnp.ones((16, 32)) * 1e-3}  # shrinks w: the cautious decay acts
  tx = orthax.normuon(reference='modded', weight_decay=1.2)
  table = orthax.describe(p, optimizer=tx)
  assert "note: normuon(reference='modded')'s matrix wd" in table
  plain = orthax.normuon(reference='modded', weight_decay=0.0)
  decay = float(np.mean(plain.update(g, plain.init(p), p)[0]['w']
                        - tx.update(g, tx.init(p), p)[0]['w']))
  lr = 0.023
  np.testing.assert_allclose(decay, 1.2 * lr * lr * np.sqrt(32 / 16),
                             rtol=1e-5)
