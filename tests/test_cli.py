"""The command-line tools and the distribution: configs by name from any
directory, clear errors, and a built wheel that works in a clean
virtualenv (its own ``orthax``, its configs, its entry points)."""

import os
import pathlib
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest

import orthax
from orthax import cli
from orthax import configs
from orthax.train import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ['--config.train.steps=2', '--config.train.eval_every=0',
        '--config.schedule.warmup_steps=0', '--config.model.d_model=32',
        '--config.model.num_layers=1']


def test_packaged_configs_by_name():
  assert configs.names() == ('gpt2_124m', 'gpt2_350m', 'gpt_1b', 'lm_cpu')
  assert configs.path('lm_cpu') == str(ROOT / 'orthax' / 'configs'
                                       / 'lm_cpu.py')
  with pytest.raises(ValueError, match="no packaged config 'lm'.*lm_cpu"):
    configs.path('lm')
  lm = configs.path('lm_cpu')
  assert configs.resolve('lm_cpu') == lm
  assert configs.resolve('lm_cpu:adamw') == lm + ':adamw'
  assert configs.resolve('gpt2_124m.py') == configs.path('gpt2_124m')
  # The former repository path keeps working when no such file exists here.
  assert configs.resolve('configs/gpt_1b.py:muon') == (
      configs.path('gpt_1b') + ':muon')


def test_config_argv(tmp_path, monkeypatch):
  own = tmp_path / 'lm_cpu.py'  # a user's file shadows the packaged name
  own.write_text('')
  monkeypatch.chdir(tmp_path)
  assert cli.config_argv(['x', '--config=lm_cpu.py:muon', '--steps=3']) == [
      'x', '--config=lm_cpu.py:muon', '--steps=3']
  assert cli.config_argv(['x', '--config', 'gpt_1b']) == [
      'x', '--config', configs.path('gpt_1b')]
  with pytest.raises(ValueError, match=r'--config=nope:muon: no such file.*'
                     r'packaged: gpt2_124m, gpt2_350m, gpt_1b, lm_cpu'):
    cli.config_argv(['x', '--config=nope:muon'])
  # A packaged config's argument is an optimizer (a typo failed inside
  # the flag parser with a traceback); a user's file takes any argument.
  with pytest.raises(ValueError, match=r"--config=lm_cpu:NorMuon: 'NorMuon' "
                     r'is not an optimizer; a packaged config takes one of '
                     r'adamw, aro, .*, normuon'):
    cli.config_argv(['x', '--config=lm_cpu:NorMuon'])
  assert cli.config_argv(['x', '--config=lm_cpu.py:anything']) == [
      'x', '--config=lm_cpu.py:anything']


def test_report_errors(monkeypatch, capsys):
  """Bad input exits 2, a failed run 1, each with one ``error:`` line and
  no traceback; other exceptions, and every one under
  ``ORTHAX_TRACEBACK=1``, propagate."""
  monkeypatch.delenv('ORTHAX_TRACEBACK', raising=False)

  def raising(e):
    def main(_):
      raise e
    return main

  for exc, status in ((ValueError('train.steps=0 must be >= 1.'), 2),
                      (FloatingPointError('loss is nan at step 3.'), 1),
                      (orthax.NonFiniteGradientError('non-finite at 2'), 1),
                      (checkpoint.DamagedCheckpointError(
                          'every checkpoint in /r is damaged'), 1)):
    with pytest.raises(SystemExit) as e:
      cli.report_errors('orthax-x', raising(exc), None)
    assert e.value.code == status, exc
    err = capsys.readouterr().err.splitlines()
    assert err == [f'orthax-x: error: {exc}',
                   'orthax-x: (ORTHAX_TRACEBACK=1 shows where it was '
                   'raised)'], err
  with pytest.raises(TypeError, match='a bug'):
    cli.report_errors('orthax-x', raising(TypeError('a bug')), None)
  monkeypatch.setenv('ORTHAX_TRACEBACK', '1')
  with pytest.raises(ValueError, match='train.steps'):
    cli.report_errors('orthax-x', raising(ValueError('train.steps')), None)
  assert capsys.readouterr().err == ''


def test_optimizer_name_override_takes_that_optimizers_rates():
  """``--config.optimizer.name=X`` ran X at the config's former optimizer's
  rates (AdamW at Muon's default of the time, 0.04); now the rates the command line leaves
  alone are X's defaults."""
  from orthax.train import configs as train_configs  # pylint: disable=g-import-not-at-top
  c = train_configs.base_config('muon')
  c.optimizer.name = 'adamw'
  train_configs.follow_optimizer_name(c, {'optimizer.name'})
  assert (c.optimizer.learning_rate, c.optimizer.adam_learning_rate) == (
      3e-3, None)
  c = train_configs.base_config('muon')
  c.optimizer.update(name='root', learning_rate=0.01)
  train_configs.follow_optimizer_name(
      c, {'optimizer.name', 'optimizer.learning_rate'})
  assert (c.optimizer.learning_rate, c.optimizer.adam_learning_rate) == (
      0.01, 3e-3)  # ROOT's registered AdamW rate
  c = train_configs.base_config('muon')
  c.optimizer.learning_rate = 0.5
  train_configs.follow_optimizer_name(c, {'optimizer.learning_rate'})
  assert c.optimizer.learning_rate == 0.5
  proc = subprocess.run(
      [sys.executable, str(ROOT / 'scripts' / 'train.py'), *TINY,
       '--config.optimizer.name=dct_adamw'],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert ('optimizer dct_adamw: peak learning rate matrix 1.5, adam 0.0085'
          in proc.stderr), proc.stderr[-3000:]


def test_bad_flag_values_are_one_line_and_exit_2(tmp_path):
  """absl's own parse errors printed ``FATAL Flags parsing error`` and
  exited 1 (a failed run's status); a config file that fails to load also
  printed its traceback. A file given as --out fails before any run."""
  conf = tmp_path / 'myconf.py'
  conf.write_text((ROOT / 'orthax' / 'configs' / 'lm_cpu.py').read_text())
  afile = tmp_path / 'afile'
  afile.write_text('x')
  syntax, raises = tmp_path / 'syntax.py', tmp_path / 'raises.py'
  syntax.write_text('def get_config(:\n  pass\n')
  raises.write_text("def get_config():\n  raise RuntimeError('no config "
                    "here')\n")
  cases = [
      ('train.py', ['--config=lm_cpu:muon', '--config.train.steps=abc'],
       "orthax-train: error: flag --config.train.steps=abc: invalid literal "
       "for int() with base 10: 'abc'"),
      ('train.py', [f'--config={conf}:bogus'],
       f'orthax-train: error: flag --config={conf}:bogus: Error whilst '
       "parsing config file: ValueError: unknown optimizer 'bogus'; choose"),
      ('compare.py', ['--optimizers=muon', f'--out={afile}'],
       f"orthax-compare: error: --out: '{afile}' is a file, not a "
       'directory.'),
      # These printed a traceback (absl wraps only some config errors).
      ('train.py', [f'--config={syntax}'],
       f'orthax-train: error: a config file failed to load: {syntax}, '
       'line 1: SyntaxError: '),
      ('train.py', [f'--config={raises}'],
       f'orthax-train: error: a config file failed to load: {raises}, '
       'line 2: RuntimeError: no config here'),
      ('train.py', ['--config=lm_cpu:muon', '--config.optimizer.bogus=None'],
       "orthax-train: error: flag --config.optimizer.bogus=None: the config "
       "has no key 'optimizer.bogus'."),
      # ml_collections applies overrides as the flag is defined: a
      # traceback and exit 1 (compare and sweep lock their config).
      ('compare.py', ['--optimizers=muon', '--config.train.stpes=4'],
       'orthax-compare: error: a --config.<key> override names a key the '
       'config lacks: stpes Did you mean steps instead of stpes?'),
      ('train.py', ['--config=lm_cpu:muon', '--config.foo.bar=1'],
       'orthax-train: error: a --config.<key> override names a key the '
       'config lacks: foo'),
      # Exit 0 with an empty table and plot; NaN losses; a plotting error.
      ('compare.py', ['--optimizers=', f'--out={tmp_path}/c'],
       'orthax-compare: error: give at least one optimizer and one '
       'learning-rate scale, got [] and'),
      ('compare.py', ['--optimizers=muon', '--eval_every=0'],
       'orthax-compare: error: flag --eval_every=0: 0 is not a positive '
       'integer'),
      ('sweep.py', ['--summarize_only', '--optimizers=adamw', '--scales=1',
                    '--widths=32', f'--out={tmp_path}/s'],
       f'orthax-sweep: error: --out={tmp_path}/s holds no run of this sweep '
       'to summarize'),
      ('train.py', ['--config=lm_cpu:muon', '--dry_run',
                    '--config.dry_run.num_layers=0'],
       'orthax-train: error: dry_run.num_layers must be an integer >= 1 or '
       'None, got 0.'),
      # Joining several processes (checked before JAX's backend starts).
      ('train.py', ['--config=lm_cpu:muon', '--process_id=1'],
       'orthax-train: error: --process_id goes with --multihost.'),
      ('train.py', ['--config=lm_cpu:muon', '--multihost', '--dry_run'],
       'orthax-train: error: --dry_run compiles on fake devices in one '
       'process: drop --multihost.'),
      ('train.py', ['--config=lm_cpu:muon', '--multihost',
                    '--num_processes=2'],
       'orthax-train: error: --coordinator_address, --num_processes and '
       '--process_id go together'),
      ('train.py', ['--config=lm_cpu:muon', '--multihost',
                    '--coordinator_address=localhost:1', '--num_processes=2',
                    '--process_id=2'],
       'orthax-train: error: --process_id=2 must be in [0, '
       '--num_processes=2).'),
      # A FileNotFoundError / NotADirectoryError after the model was built.
      ('train.py', ['--config=lm_cpu:muon', '--workdir='],
       'orthax-train: error: --workdir: the path is empty.'),
      ('train.py', ['--config=lm_cpu:muon', f'--workdir={afile}/sub'],
       f"orthax-train: error: --workdir: '{afile}/sub' cannot be created "
       f"('{afile}' is a file)."),
  ]
  for script, args, want in cases:
    proc = subprocess.run(
        [sys.executable, str(ROOT / 'scripts' / script), *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-2].startswith(want), proc.stderr[-3000:]


def test_sweep_reports_a_bad_width_in_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, str(ROOT / 'scripts' / 'sweep.py'), '--optimizers=muon',
       '--widths=130', f'--out={tmp_path}', '--max_runs=1'],
      capture_output=True, text=True, cwd=tmp_path, timeout=600)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.splitlines()[-2] == (
      'orthax-sweep: error: width 130 is not a multiple of '
      'model.num_heads=4.'), proc.stderr[-3000:]


@pytest.mark.parametrize('summarize_only', [True, False])
def test_reference_modes_name_a_missing_sweep(tmp_path, summarize_only):
  """Run outside the checkout, the default ``--sweep_runs`` (a relative
  path) does not exist: the library-mode column was silently empty; and
  with training, this was found after every run had trained."""
  proc = subprocess.run(
      [sys.executable, str(ROOT / 'scripts' / 'sweep.py'),
       '--reference_modes', f'--out={tmp_path}/o', '--optimizers=muon',
       '--summarize_only' if summarize_only else '--steps=2'],
      capture_output=True, text=True, cwd=tmp_path, timeout=600)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.splitlines()[-2].startswith(
      'orthax-sweep: error: --sweep_runs=results/sweep/runs.jsonl: no such '
      'file'), proc.stderr[-3000:]
  assert not list((tmp_path / 'o').glob('**/*.jsonl'))  # nothing trained


def _run(args, cwd, env=None):
  """``args`` in ``cwd``; by default without ``PYTHONPATH``, which could
  show pip a checkout's own ``orthax`` (and the ``egg-info`` the build
  leaves there) as already installed."""
  if env is None:
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  return subprocess.run(args, cwd=cwd, capture_output=True, text=True,
                        timeout=600, env=env)


@pytest.fixture(scope='module')
def wheel_venv(tmp_path_factory):
  """The sdist and wheel built from this checkout (``python -m build``,
  checked by ``twine check``), and a fresh virtualenv with only the wheel
  installed; the dependencies (jax, optax, flax, ...) come from this
  environment's site-packages through a ``.pth`` line, which adds the
  directory but runs none of its ``.pth`` files, so the editable orthax
  of this environment is not visible there."""
  tmp = tmp_path_factory.mktemp('dist')
  out = tmp / 'dist'
  proc = _run([sys.executable, '-m', 'build', '--no-isolation', '--outdir',
               str(out), str(ROOT)], cwd=tmp)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  dists = sorted(out.iterdir(), key=lambda p: p.suffix)  # .gz, .whl
  assert [p.suffix for p in dists] == ['.gz', '.whl'], dists
  proc = _run([sys.executable, '-m', 'twine', 'check', '--strict',
               *map(str, dists)], cwd=tmp)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  venv = tmp / 'venv'
  proc = _run([sys.executable, '-m', 'venv', '--without-pip', str(venv)],
              cwd=tmp)
  assert proc.returncode == 0, proc.stderr
  py = venv / 'bin' / 'python'
  site = pathlib.Path(_run([str(py), '-c', 'import sysconfig; print('
                            'sysconfig.get_paths()["purelib"])'],
                           cwd=tmp).stdout.strip())
  proc = _run([sys.executable, '-m', 'pip', '--python', str(py), 'install',
               '--no-deps', '--no-index', '--ignore-installed',
               str(dists[1])], cwd=tmp)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  (site / 'zz_test_dependencies.pth').write_text(
      sysconfig.get_paths()['purelib'] + '\n')
  return dists, venv, tmp


def test_wheel_contents(wheel_venv):
  (sdist, whl), _, _ = wheel_venv
  assert whl.name.startswith('orthax_optim-')
  names = zipfile.ZipFile(whl).namelist()
  for f in ('orthax/py.typed', 'orthax/configs/lm_cpu.py',
            'orthax/configs/gpt_1b.py', 'orthax/cli/train.py'):
    assert f in names, f
  assert not [n for n in names if n.startswith(('tests/', 'scripts/'))]
  meta = next(n for n in names if n.endswith('entry_points.txt'))
  text = zipfile.ZipFile(whl).read(meta).decode()
  for tool in ('orthax-train = orthax.cli.train:run',
               'orthax-compare = orthax.cli.compare:run',
               'orthax-sweep = orthax.cli.sweep:run',
               'orthax-prepare-data = orthax.cli.prepare_data:run'):
    assert tool in text
  lic = [n for n in names if n.endswith('/LICENSE')]
  assert lic, names


def test_sdist_contents(wheel_venv):
  """The sdist had no CHANGELOG.md (the README links it), and it carried
  ``tests/test_*.py`` without the helpers they import."""
  (sdist, _), _, _ = wheel_venv
  with tarfile.open(sdist) as tar:
    names = {n.split('/', 1)[1] for n in tar.getnames() if '/' in n}
  for f in ('README.md', 'LICENSE', 'CHANGELOG.md', 'pyproject.toml',
            'orthax/py.typed', 'orthax/__init__.py', 'orthax/configs/lm_cpu.py'):
    assert f in names, f
  assert not [n for n in names if n.startswith('tests/') or n.endswith('.pyc')]


def test_wheel_works_in_a_clean_venv_from_any_directory(wheel_venv):
  _, venv, tmp = wheel_venv
  work = tmp / 'elsewhere'
  work.mkdir()
  env = None  # _run's: no PYTHONPATH
  proc = _run([str(venv / 'bin' / 'python'), '-c',
               'import orthax, jax.numpy as jnp; print(orthax.__file__); '
               "tx = orthax.muon(0.02); s = tx.init({'w': jnp.ones((4, 4))})"
               "; print(orthax.__version__)"], cwd=work, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  path, version = proc.stdout.split()
  assert path.startswith(str(venv)), path
  import orthax  # pylint: disable=g-import-not-at-top
  assert version == orthax.__version__
  proc = _run([str(venv / 'bin' / 'orthax-train'), '--config=lm_cpu:adamw',
               *TINY, '--workdir=run'], cwd=work, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '"steps": 2' in proc.stdout
  assert (work / 'run' / 'metrics.jsonl').exists()
  proc = _run([str(venv / 'bin' / 'orthax-compare'), '--help'], cwd=work,
              env=env)
  assert '--lr_scales' in proc.stdout, proc.stderr  # absl's --help exits 1


def test_output_dir_refuses_a_file_naming_the_flag(tmp_path):
  """``--out``/``--workdir`` naming a file ended in a FileExistsError
  traceback, for orthax-compare after every run had trained."""
  f = tmp_path / 'a_file'
  f.write_text('x')
  for create in (True, False):
    with pytest.raises(ValueError, match=f"^--out: '{f}' is a file, not a "
                       'directory.$'):
      cli.output_dir('out', str(f), create=create)
  assert cli.output_dir('out', str(tmp_path / 'new')) == str(tmp_path / 'new')
  assert (tmp_path / 'new').is_dir()
  assert cli.output_dir('workdir', str(tmp_path / 'later'), create=False)
  assert not (tmp_path / 'later').exists()
  assert cli.output_dir('out', None) is None


def test_none_overrides_give_a_key_back_to_its_default():
  """absl parsed ``--config.optimizer.adam_learning_rate=None`` as a float
  and failed: a config could not hand a rate back to the recipe's own
  default. The override is set after parsing; a later override of the same
  key wins, as absl's own do."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  argv = ['prog', '--config=lm_cpu:muon',
          '--config.optimizer.adam_learning_rate=None',
          '--config.optimizer.weight_decay=none',
          '--config.optimizer.weight_decay=0.1', '--config.train.steps=3']
  rest, nones = cli._none_overrides(argv, {'config'})  # pylint: disable=protected-access
  assert nones == [('config', 'optimizer.adam_learning_rate')]
  assert rest == [a for a in argv if not a.endswith(('=None', '=none'))]
  cfg = ml_collections.ConfigDict(
      {'optimizer': {'adam_learning_rate': 3e-3, 'kwargs': {}}})
  cli._set_none(cfg, 'config', 'optimizer.adam_learning_rate')  # pylint: disable=protected-access
  assert cfg.optimizer.adam_learning_rate is None
  # An undefined flag is left for absl, which names it (a KeyError before).
  assert cli._none_overrides(['p', '--nosuch.x=None'], {'config'})[1] == []  # pylint: disable=protected-access
  with pytest.raises(ValueError, match='--steps is not a config flag'):
    cli._set_none(5, 'steps', 'x')  # pylint: disable=protected-access
  for bad in ('optimizer.bogus', 'bogus.x', 'optimizer.adam_learning_rate.x'):
    with pytest.raises(ValueError, match=f"no key '{bad}'"):
      cli._set_none(cfg, 'config', bad)  # pylint: disable=protected-access
