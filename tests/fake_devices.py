"""Running a case script on 8 fake CPU devices, in a subprocess (the XLA
flag must be set before JAX starts), and reading the JSON it prints."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import traceback

HERE = pathlib.Path(__file__).parent


def run_cases(script: str, timeout: int, check_errors: bool = True) -> dict:
  """Runs ``tests/<script>`` with 8 fake devices; its last stdout line is a
  JSON object ``{case: result}``. With ``check_errors``, a case that
  reported an ``error`` fails here, with its traceback."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                      ' --xla_force_host_platform_device_count=8').strip()
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join(
      [str(HERE.parent)] + [p for p in [env.get('PYTHONPATH')] if p])
  proc = subprocess.run([sys.executable, str(HERE / script)], env=env,
                        capture_output=True, text=True, timeout=timeout,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  if check_errors:
    for name, r in res.items():
      assert 'error' not in r, f"{name}: {r['error']}\n{r.get('trace')}"
  return res


def guarded(fn) -> dict:
  """Used inside a case script: ``fn()``'s result, or the error it raised
  (message and traceback) for :func:`run_cases` to report."""
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except
    return {'error': f'{type(e).__name__}: {e}'[:2000],
            'trace': traceback.format_exc()[-3000:]}


def pinned_step(tx, state, mesh):
  """``(step, state)``: ``jax.jit(tx.update)`` whose state output keeps
  the shardings of ``state`` (its scalars replicated), and ``state`` placed
  on them, so every step runs the first step's executable. A state fresh
  from ``init`` is placed unlike a step's output (uncommitted scalars,
  shardings the compiler picks), which makes a plain ``jax.jit`` compile
  the second step again. Only for checks of the updates: it fixes the
  state's layout, so it cannot test it (and the compiled collectives are
  the same: checked on muon, normuon, namo, root and lanton over fsdp8 and
  fsdp4×tp2)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec  # pylint: disable=g-import-not-at-top

  def placed(x):
    s = x.sharding
    return s if isinstance(s, NamedSharding) else NamedSharding(
        mesh, PartitionSpec())
  shardings = jax.tree.map(placed, state)
  return (jax.jit(tx.update, out_shardings=(None, shardings)),
          jax.device_put(state, shardings))
