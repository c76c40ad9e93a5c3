"""Multi-device trainer cases, run by tests/test_train_mesh.py in a
subprocess with fake CPU devices (the count is argv[1]); prints JSON."""

import json
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           f' --xla_force_host_platform_device_count='
                           f'{sys.argv[1]}')
os.environ['JAX_PLATFORMS'] = 'cpu'

import importlib.util  # noqa: E402
import pathlib  # noqa: E402

from orthax.train import dry_run  # noqa: E402
from orthax.train import trainer  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_train import tiny  # noqa: E402
from train_faults import inject_nan  # noqa: E402

CONFIGS = pathlib.Path(__file__).parent.parent / 'orthax' / 'configs'


def load_config(name, arg=''):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f'{name}.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def mesh_numerics():
  """Train-loss curves on 3-D meshes vs one device: muon on data×fsdp×tensor
  and fsdp×tensor; normuon, namo (their stages' own collectives) and adamw
  (not distributed) on data×fsdp×tensor. No evaluation: the train losses
  are compared."""
  out = {}
  for name in ('muon', 'normuon', 'namo', 'adamw'):
    curves = {}
    meshes = [(1, 1, 1), (2, 2, 2)] + ([(1, 4, 2)] if name == 'muon' else [])
    for mesh in meshes:
      c = tiny(name, steps=4)
      c.train.eval_every = 0
      c.model.update(d_model=64, num_heads=4)
      c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2],
                    comm_dtype='float32')
      r = trainer.train(c, None, progress=False)
      curves['x'.join(map(str, mesh))] = [x['loss'] for x in r['train']]
    out[name] = curves
  return out


def nonfinite_on_mesh():
  """A NaN gradient at step 2 on an fsdp=2 mesh with train.nonfinite=
  'raise': the error names the step and leaves, and nothing hangs."""
  inject_nan({2})
  c = tiny('muon', steps=4)
  c.train.eval_every = 0
  c.mesh.fsdp = 2
  try:
    trainer.train(c, None, progress=False)
  except ValueError as e:
    return {'error': type(e).__name__, 'message': str(e)}
  return {'error': None}


# (optimizer, saved on, resumed on): data × fsdp × tensor.
RESUMES = (('aro', (1, 4, 2), (2, 2, 2)), ('aro', (1, 8, 1), (1, 1, 1)),
           ('dct_adamw', (1, 1, 1), (1, 8, 1)))


def resume_on_another_mesh(workdir):
  """ARO and DCT-AdamW (per-matrix state on the owner devices) trained 2
  steps on one mesh with a checkpoint, resumed with --force on another
  for 2 more (:data:`RESUMES`; fsdp8 and one device differ in their number
  of slot groups too): their train losses against 4 steps on that mesh
  without a break, and on the first mesh."""
  out = {}
  for name, src, dst in RESUMES:
    def cfg(mesh, name=name):
      c = tiny(name, steps=4)
      c.train.eval_every = 0
      c.train.checkpoint_every = 2
      c.model.update(d_model=64, num_heads=4)
      c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2],
                    comm_dtype='float32')
      return c
    mesh = lambda m: 'x'.join(map(str, m))
    key = f'{name}/{mesh(src)}->{mesh(dst)}'
    where = os.path.join(workdir, key.replace('/', '_').replace('>', ''))
    trainer.train(cfg(src), where, progress=False, stop_at=2)
    resumed = trainer.train(cfg(dst), where, progress=False, force=True)
    whole = trainer.train(cfg(dst), None, progress=False)
    first = trainer.train(cfg(src), None, progress=False)
    out[key] = {'resumed': [x['loss'] for x in resumed['train']],
                'whole': [x['loss'] for x in whole['train']],
                'first_mesh': [x['loss'] for x in first['train']]}
  return out


def dry_runs(names):
  out = {}
  for name in names:
    r = dry_run.dry_run(load_config(name))
    out[name] = {k: v for k, v in r.items()
                 if isinstance(v, (int, float, str, dict))}
    out[name]['text'] = dry_run.format_report(r)
  return out


if __name__ == '__main__':
  what = sys.argv[2]
  if what == 'numerics':
    print(json.dumps(mesh_numerics()))
  elif what == 'nonfinite':
    print(json.dumps(nonfinite_on_mesh()))
  elif what == 'resume':
    import tempfile  # noqa: E402
    with tempfile.TemporaryDirectory() as d:
      print(json.dumps(resume_on_another_mesh(d)))
  else:
    print(json.dumps(dry_runs(what.split(','))))
