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
