"""The reference trainer (orthax.train): every optimizer trains, exact
resume, schedules, logical axes, config errors, compare."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip('ml_collections')
pytest.importorskip('orbax.checkpoint')

from orthax.train import compare  # noqa: E402
from orthax.train import configs  # noqa: E402
from orthax.train import metrics  # noqa: E402
from orthax.train import model as model_lib  # noqa: E402
from orthax.train import optim  # noqa: E402
from orthax.train import partitioning  # noqa: E402
from orthax.train import trainer  # noqa: E402


def tiny(name: str = 'muon', steps: int = 24):
  """A 2-layer width-32 model on 8×32 bytes: seconds per run."""
  c = configs.base_config(name)
  c.model.update(d_model=32, num_layers=2, num_heads=2, seq_len=32)
  c.data.batch_size = 8
  c.schedule.warmup_steps = 2
  c.train.update(steps=steps, log_every=1, eval_every=steps // 2,
                 eval_batches=2)
  return c


@pytest.mark.parametrize('name', configs.optimizer_names())
def test_every_optimizer_lowers_the_loss(name):
  out = trainer.train(tiny(name), progress=False)
  losses = [r['loss'] for r in out['train']]
  assert len(losses) == 24 and all(map(math.isfinite, losses)), losses
  # Byte-level start is ~log(256) = 5.5; every optimizer must get well below.
  assert np.mean(losses[-4:]) < losses[0] - 1.0, (name, losses)
  assert out['eval'][-1]['val_loss'] < losses[0] - 1.0, out['eval']
  rec = out['train'][5]
  assert rec['step'] == 6 and rec['tokens'] == 6 * 8 * 32
  # Per-branch learning rates are logged and follow the shared schedule.
  shape = optim.schedule_shape(24, kind='cosine', warmup_steps=2,
                               final_fraction=0.1)
  opt = configs.optimizer(name)
  main = [k for k in rec if k.startswith('lr/') and k != 'lr/adam']
  assert main or name == 'adamw'
  for k in main:
    np.testing.assert_allclose(rec[k], opt.learning_rate * shape(5),
                               rtol=1e-6)
  if opt.adam_learning_rate is not None:
    np.testing.assert_allclose(rec['lr/adam'],
                               opt.adam_learning_rate * shape(5), rtol=1e-6)


def test_resume_is_bit_exact(tmp_path):
  c = tiny('normuon', steps=12)
  c.train.checkpoint_every = 4
  whole = trainer.train(c, str(tmp_path / 'whole'), progress=False)
  part = tmp_path / 'part'
  first = trainer.train(c, str(part), progress=False, stop_at=10)
  assert first['summary']['steps'] == 10
  # Interrupted after step 10: the last checkpoint is step 8 (or the forced
  # save at 10); restart and finish.
  second = trainer.train(c, str(part), progress=False)
  assert second['summary']['steps'] == 12
  logged = metrics.read_jsonl(str(part / 'metrics.jsonl'))
  assert [r['step'] for r in logged] == list(range(1, 13))
  for a, b in zip(whole['train'], logged):
    assert a['loss'] == b['loss'], (a, b)  # bit for bit
  for a, b in zip(jax.tree.leaves(whole['state']),
                  jax.tree.leaves(second['state'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_from_an_earlier_checkpoint(tmp_path):
  """A crash loses the steps after the last checkpoint; they are redone."""
  c = tiny('muon', steps=10)
  c.train.checkpoint_every = 4
  whole = trainer.train(c, None, progress=False)
  from orthax.train import checkpoint  # pylint: disable=g-import-not-at-top
  trainer.train(c, str(tmp_path), progress=False, stop_at=6)
  ck = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'), 4)
  assert ck.latest_step() == 6  # the stop forces a save
  ck._mgr.delete(6)  # pylint: disable=protected-access
  ck.close()
  resumed = trainer.train(c, str(tmp_path), progress=False)
  logged = metrics.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert [r['step'] for r in logged] == list(range(1, 11))
  assert [r['loss'] for r in logged] == [r['loss'] for r in whole['train']]
  assert resumed['summary']['steps'] == 10


def test_schedule_shape():
  s = optim.schedule_shape(100, kind='cosine', warmup_steps=10,
                           final_fraction=0.1)
  np.testing.assert_allclose([s(0), s(5), s(10), s(55), s(100)],
                             [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
  lin = optim.schedule_shape(100, kind='linear', warmup_steps=0,
                             final_fraction=0.0)
  np.testing.assert_allclose([lin(0), lin(50), lin(100)], [1.0, 0.5, 0.0],
                             atol=1e-6)
  const = optim.schedule_shape(100, kind='constant', warmup_steps=4)
  np.testing.assert_allclose([const(2), const(4), const(99)], [0.5, 1, 1])
  with pytest.raises(ValueError, match='schedule.kind'):
    optim.schedule_shape(100, kind='step')
  with pytest.raises(ValueError, match='warmup_steps'):
    optim.schedule_shape(100, warmup_steps=100)


def test_logical_axes_name_every_parameter():
  for cfg in (model_lib.GPTConfig(num_layers=2),
              model_lib.GPTConfig(num_layers=2, positions='learned',
                                  tie_embeddings=True)):
    _, _, params = model_lib.abstract(cfg)
    axes = model_lib.logical_axes(params)
    flat = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    assert len(flat) == len(jax.tree.leaves(params))
    qk = axes['blocks']['attn']['query']['kernel']
    assert qk == ('layers', 'embed', 'heads')
    specs = partitioning.param_specs(axes)
    assert tuple(specs['blocks']['mlp']['fc2']['kernel']) == (
        None, 'tensor', 'fsdp')
  with pytest.raises(ValueError, match='extra/kernel'):
    model_lib.logical_axes({'extra': {'kernel': np.zeros((2, 2))}})


@pytest.mark.parametrize('d_model', [32, 128])
def test_a_tied_head_starts_near_a_uniform_guess_and_trains(d_model):
  """The first loss is near ln 256 (a uniform guess over bytes) with the
  head tied to the embedding, as untied: the table's unit-variance rows
  made each token's logit for itself about d_model, 27 nats of loss at
  d_model 32 and 104 at 128 (the shipped GPT-2 configs tie). Then it
  trains about as untied does."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  for tie, positions in ((False, 'rope'), (True, 'rope'),
                         (True, 'learned')):
    cfg = model_lib.GPTConfig(d_model=d_model, num_layers=2, num_heads=2,
                              seq_len=32, tie_embeddings=tie,
                              positions=positions)
    model = model_lib.GPT(cfg, nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, 256)
    logits = model(tokens)
    first = float(jnp.mean(-jnp.take_along_axis(
        jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1)))
    assert abs(first - math.log(256)) < 1.0, (tie, positions, first)
  if d_model == 32:
    out = {tie: trainer.train(_tied(tie), None, progress=False)
           for tie in (False, True)}
    final = {t: o['summary']['final_loss'] for t, o in out.items()}
    assert final[True] < final[False] + 0.5, final


def _tied(tie):
  c = tiny('muon', steps=24)
  c.model.tie_embeddings = tie
  return c


def test_check_divisible_names_the_parameter_and_reads_none_as_replicated():
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  params = {'b': np.zeros(6), 'w': np.zeros((8, 6))}
  # A None entry is replicated and keeps its place (the check zipped the
  # flattened specs, which drop None, against every parameter).
  partitioning.check_divisible(params, {'b': None, 'w': P('fsdp', None)},
                               {'fsdp': 4})
  with pytest.raises(ValueError, match="parameter 'w' of shape \\(8, 6\\): "
                     "dimension 6 is sharded over mesh axis 'tensor' of size 4"):
    partitioning.check_divisible(params, {'b': None, 'w': P(None, 'tensor')},
                                 {'tensor': 4})


def test_stacked_kernels_route_as_matrices():
  import orthax  # pylint: disable=g-import-not-at-top
  _, _, params = model_lib.abstract(model_lib.GPTConfig(num_layers=3))
  routes = orthax.Router().routes(params)
  q = routes['blocks']['attn']['query']['kernel']
  assert q.label == 'matrix' and q.spec.resolve((3, 128, 128)) is not None
  assert routes['embed']['embedding'].label == 'adam'
  assert routes['lm_head']['kernel'].label == 'adam'
  assert routes['blocks']['attn_norm']['scale'].label == 'adam'


def test_mesh_that_does_not_divide_is_a_clear_error():
  c = tiny()
  c.mesh.fsdp = 3
  with pytest.raises(ValueError, match=r'data.batch_size=8 .*mesh size 3'):
    trainer.build(c, 256, abstract=True)
  c = tiny()
  c.mesh.tensor = 3
  with pytest.raises(ValueError, match=r"blocks/attn/key/kernel.*'tensor' "
                     'of size 3'):
    trainer.build(c, 256, abstract=True)
  c = tiny()
  c.mesh.fsdp = 2
  with pytest.raises(ValueError, match='needs 2 devices'):
    trainer.build(c, 256, abstract=True, devices=jax.devices()[:1])


def test_the_mesh_follows_the_device_topology(monkeypatch):
  """The trainer's mesh takes its device layout from
  ``mesh_utils.create_device_mesh`` (a TPU slice's torus), with the axes in
  order of increasing traffic; where that cannot lay out the devices (part
  of a TPU slice) they keep their order."""
  calls = []
  real = partitioning.mesh_utils.create_device_mesh

  def spy(shape, devices, **kw):
    calls.append((tuple(shape), list(devices), kw))
    return real(shape, devices, **kw)

  monkeypatch.setattr(partitioning.mesh_utils, 'create_device_mesh', spy)
  devices = jax.devices()[:1]
  mesh = partitioning.make_mesh({'fsdp': 1}, devices)
  assert calls == [((1, 1, 1), devices,
                    {'allow_split_physical_axes': True})]
  assert mesh.axis_names == partitioning.MESH_AXES
  assert list(mesh.devices.flat) == devices

  def refuse(shape, devices, **kw):
    raise ValueError('cannot lay out a part of the slice')

  monkeypatch.setattr(partitioning.mesh_utils, 'create_device_mesh', refuse)
  mesh = partitioning.make_mesh({'data': 1}, devices)
  assert list(mesh.devices.flat) == devices and mesh.devices.shape == (1, 1, 1)


def test_bad_config_values_are_clear_errors():
  c = tiny()
  c.optimizer.name = 'nosuch'
  with pytest.raises(ValueError, match='optimizer.name=.nosuch'):
    trainer.build(c, 256, abstract=True)
  c = tiny()
  c.optimizer.kwargs.bogus = 1
  with pytest.raises(ValueError, match=r"optimizer.kwargs.bogus: not a "
                     r"keyword of recipe 'muon'"):
    trainer.build(c, 256, abstract=True)
  c = tiny()
  c.model.num_heads = 3
  with pytest.raises(ValueError, match='num_heads=3'):
    trainer.build(c, 256, abstract=True)
  with pytest.raises(ValueError, match='unknown optimizer'):
    configs.optimizer('sgd')


def test_compare_table_and_plot(tmp_path):
  base = tiny(steps=8)
  results = compare.run(base, ['adamw', 'muon'], [1.0, 2.0], eval_every=4,
                        progress=False)
  assert [(r['optimizer'], r['lr_scale']) for r in results] == [
      ('adamw', 1.0), ('adamw', 2.0), ('muon', 1.0), ('muon', 2.0)]
  best = compare.best_runs(results)
  for name in ('adamw', 'muon'):
    runs = [r for r in results if r['optimizer'] == name]
    assert best[name]['final_val_loss'] == min(r['final_val_loss']
                                               for r in runs)
  target = best['adamw']['final_val_loss']
  assert compare.steps_to(best['adamw'], target) == 8
  md = compare.table(results)
  assert md.count('\n') == 5 and 'adamw*' in md and 'muon*' in md
  assert muon_state_smaller(results)
  compare.plot(results, str(tmp_path / 'c.png'))
  assert (tmp_path / 'c.png').stat().st_size > 10_000


def muon_state_smaller(results):
  """Muon keeps one moment on matrices where AdamW keeps two."""
  by = {r['optimizer']: r['opt_state_bytes'] for r in results}
  return by['muon'] < by['adamw']


def test_steps_to_target_interpolates_the_first_crossing():
  r = {'eval_steps': [10, 20, 30, 40], 'val_loss': [3.0, 2.0, 2.4, 1.5]}
  assert compare.steps_to(r, 2.5) == pytest.approx(15.0)
  assert compare.steps_to(r, 2.0) == 20.0  # reached at an evaluation
  assert compare.steps_to(r, 1.8) == pytest.approx(30 + 10 * 0.6 / 0.9)
  assert compare.steps_to(r, 3.5) == 10.0  # already at the first
  assert compare.steps_to(r, 1.0) is None


def test_compare_script_cli(tmp_path):
  """The README's main command, shrunk: the script runs end to end."""
  import pathlib  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(__file__).parent.parent
  proc = subprocess.run(
      [sys.executable, 'scripts/compare.py', '--optimizers=adamw,muon',
       '--lr_scales=1', '--steps=4', '--eval_every=2',
       f'--out={tmp_path}', '--config.model.d_model=32',
       '--config.model.num_layers=1', '--config.model.num_heads=2',
       '--config.model.seq_len=32', '--config.data.batch_size=4'],
      capture_output=True, text=True, cwd=root, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '| adamw* |' in proc.stdout and '| muon* |' in proc.stdout
  for f in ('compare.md', 'compare.json', 'loss_curves.png'):
    assert (tmp_path / f).exists(), f
