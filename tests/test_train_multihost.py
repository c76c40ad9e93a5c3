"""The trainer on two processes (``orthax-train --multihost``), four fake
CPU devices each, one mesh over all eight, joined by JAX's distributed
runtime on localhost (gloo collectives): what a multi-host TPU slice or
several GPU nodes run.

Process 0 alone writes the run directory; both resume from the same intact
checkpoint, damaged ones moved aside once, per-matrix slot states moved
across processes to a new mesh; a SIGTERM or Ctrl-C reaching one process
checkpoints the step both agree on. Before 2026-12-07 every record was
written twice, a rerun raced on ``config.json``, a resume of a slot-state
recipe failed on process 1 and the other waited for it, and a signal on
one process left the other waiting forever.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip('ml_collections')
pytest.importorskip('orbax.checkpoint')

from orthax.train import faults  # noqa: E402
from orthax.train import metrics  # noqa: E402

ROOT = pathlib.Path(__file__).parent.parent
# The command line in a child; SLOW seconds of sleep per batch, so that a
# signal lands mid-run.
CHILD = """
import os, sys, time
from orthax.cli import train
from orthax.train import data
slow = float(os.environ.get('SLOW', 0))
if slow:
  batch = data.TokenLoader.batch
  data.TokenLoader.batch = lambda self, i: (time.sleep(slow),
                                            batch(self, i))[1]
train.run(['orthax-train'] + sys.argv[1:])
"""
# A 2-layer width-32 model on 8×32 bytes, every record logged.
TINY = ['--config.model.d_model=32', '--config.model.num_layers=2',
        '--config.model.num_heads=2', '--config.model.seq_len=32',
        '--config.data.batch_size=8', '--config.schedule.warmup_steps=2',
        '--config.train.log_every=1', '--config.train.eval_batches=2']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _start(work, args, slow=0.0, processes=2, devices=4):
  """``processes`` children of ``orthax-train --multihost`` training into
  ``work`` (``args[0]``: the ``--config``, before its overrides)."""
  env = dict(os.environ)
  flags = env.get('ORTHAX_TEST_XLA_FLAGS', env.get('XLA_FLAGS', ''))
  env.update(XLA_FLAGS=(f'{flags} --xla_force_host_platform_device_count='
                        f'{devices}').strip(),
             JAX_PLATFORMS='cpu', JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo',
             SLOW=str(slow))
  port = _free_port()
  return [subprocess.Popen(
      [sys.executable, '-c', CHILD, '--multihost',
       f'--coordinator_address=localhost:{port}',
       f'--num_processes={processes}', f'--process_id={i}',
       f'--workdir={work}', args[0], *TINY, *args[1:]],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=env) for i in range(processes)]


def _finish(procs, timeout=420):
  """``[(returncode, summary or None, stderr)]`` of each child."""
  out = []
  for p in procs:
    try:
      stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail('a process waited for the other past the timeout: '
                  + p.communicate()[1][-3000:])
    start = stdout.find('{')
    out.append((p.returncode,
                json.loads(stdout[start:]) if start >= 0 else None, stderr))
  return out


def _records(work):
  return metrics.read_jsonl(str(work / 'metrics.jsonl'))


def test_two_processes_write_once_and_resume_a_moved_slot_state(tmp_path):
  """DCT-AdamW (per-matrix state on its owner device) on an 8-device mesh
  over two processes: one record per step, a damaged step moved aside once,
  and a forced resume on another mesh moving every matrix's state across
  processes."""
  work = tmp_path / 'run'
  base = ['--config=lm_cpu:dct_adamw', '--config.mesh.fsdp=8',
          '--config.train.steps=8', '--config.train.eval_every=4',
          '--config.train.checkpoint_every=4']
  first = _finish(_start(work, base))
  for rc, summary, err in first:
    assert rc == 0 and summary['steps'] == 8, err[-3000:]
  assert first[0][1]['final_loss'] == first[1][1]['final_loss']
  assert [r['step'] for r in _records(work)] == list(range(1, 9))
  assert sorted(os.listdir(work / 'checkpoints')) == ['4', '8']
  assert (work / 'checkpoints' / '8' / 'orthax_checksums.json').exists()
  assert json.loads((work / 'config.json').read_text())['mesh']['fsdp'] == 8

  # Process 1's shard of step 8 truncated; resumed from step 4 with the
  # mesh split as data 2 × fsdp 4 (another place for each matrix's state).
  shard = next(p for p in (work / 'checkpoints' / '8').rglob('*')
               if p.is_file() and 'ocdbt.process_1' in str(p)
               and p.parent.name == 'd')
  shard.write_bytes(shard.read_bytes()[:10])
  again = _finish(_start(work, base[:1] + [
      '--config.mesh.data=2', '--config.mesh.fsdp=4', *base[2:], '--force']))
  for rc, summary, err in again:
    assert rc == 0 and summary['resumed_from'] == 4, err[-3000:]
    assert 'damaged' in err
  assert os.listdir(tmp_path / 'run' / 'checkpoints.damaged') == ['8']
  assert [r['step'] for r in _records(work)] == list(range(1, 9))
  # The same steps on another mesh: equal up to the order of reductions.
  assert again[0][1]['final_loss'] == pytest.approx(
      first[0][1]['final_loss'], rel=1e-5)

  # A newest step without its checksum record is passed over for the
  # verified one before it (a read failing on one process alone would
  # leave the other inside orbax's restore).
  (work / 'checkpoints' / '8' / 'orthax_checksums.json').unlink()
  unverified = _finish(_start(work, base[:1] + [
      '--config.mesh.data=2', '--config.mesh.fsdp=4', *base[2:]]))
  for rc, summary, err in unverified:
    assert rc == 0 and summary['resumed_from'] == 4, err[-3000:]
    assert 'no checksum record; on several processes' in err

  # A failure on process 0 alone (it rewrites metrics.jsonl, here a
  # directory) stops both (before: process 1 waited for it forever).
  (work / 'metrics.jsonl').unlink()
  (work / 'metrics.jsonl').mkdir()
  failed = _finish(_start(work, base[:1] + [
      '--config.mesh.data=2', '--config.mesh.fsdp=4', *base[2:]]),
                   timeout=240)
  assert failed[0][0] != 0 and 'metrics.jsonl' in failed[0][2], failed[0][2]
  assert failed[1][0] != 0, failed[1][2][-3000:]
  assert 'process(es) [0] failed' in failed[1][2], failed[1][2][-3000:]


@pytest.mark.parametrize('sig,target', [('SIGTERM', 1), ('SIGINT', 0)])
def test_a_signal_on_one_process_checkpoints_both_at_one_step(
    tmp_path, sig, target):
  """SIGTERM on process 1 (a preemption notice that reached one host), or
  Ctrl-C on process 0: both save the step they agree on and stop; the
  rerun resumes there and finishes."""
  work = tmp_path / 'run'
  args = ['--config=lm_cpu:muon', '--config.mesh.fsdp=8',
          '--config.train.steps=40', '--config.train.eval_every=0']
  procs = _start(work, args, slow=0.2)
  deadline = time.time() + 300
  while len(_records(work)) < 3:
    assert all(p.poll() is None for p in procs), _finish(procs)
    assert time.time() < deadline
    time.sleep(0.05)
  procs[target].send_signal(getattr(signal, sig))
  done = _finish(procs)
  codes = [rc for rc, _, _ in done]
  assert codes == ([75, 75] if sig == 'SIGTERM' else [130, 75]), [
      err[-2000:] for _, _, err in done]
  stop = len(_records(work))
  assert 3 <= stop < 40
  assert os.listdir(work / 'checkpoints') == [str(stop)]
  assert done[1][1]['preempted'] and done[1][1]['steps'] == stop
  if sig == 'SIGINT':
    assert f'interrupted (Ctrl-C) after step {stop} of 40' in done[0][2]
    return
  assert done[0][1]['steps'] == stop
  # A SIGTERM before the resumed run's first step: saved after that step
  # (before: lost, the agreed step counted from 0 and the run from stop).
  procs = _start(work, args, slow=0.2)
  for line in procs[0].stderr:
    if 'resumed from checkpoint' in line:
      break
  procs[0].send_signal(signal.SIGTERM)
  early = _finish(procs)
  assert [rc for rc, _, _ in early] == [75, 75], [
      err[-2000:] for _, _, err in early]
  assert early[1][1]['resumed_from'] == stop
  assert sorted(os.listdir(work / 'checkpoints'), key=int)[-1] == str(
      stop + 1)
  again = _finish(_start(work, args))
  for rc, summary, err in again:
    assert rc == 0 and summary['resumed_from'] == stop + 1, err[-3000:]
  recs = _records(work)
  assert [r['step'] for r in recs] == list(range(1, 41))
  assert recs[-1]['loss'] < recs[0]['loss'] - 1.0


def test_a_mesh_that_leaves_out_a_process_is_refused(tmp_path):
  """Four of the eight devices: process 1 would have none in the mesh.
  Both say so and exit 2 (before: a RuntimeError traceback from JAX, fetching
  an array with no shard on process 1)."""
  done = _finish(_start(tmp_path / 'run', ['--config=lm_cpu:muon',
                                           '--config.mesh.fsdp=4']))
  for rc, _, err in done:
    assert rc == 2, err[-3000:]
    assert ("mesh {'data': 1, 'fsdp': 4, 'tensor': 1} has 4 devices; on 2 "
            'processes it must span all 8') in err


def test_the_stop_point_counts_this_runs_steps(monkeypatch):
  """The sync's step ids are this run's steps from 1 (JAX agrees on the
  furthest step any process reported, plus one: 1 for a notice before the
  first step), whatever step the run resumed from."""
  asked = []
  monkeypatch.setattr(faults.hosts, 'reached_stop_point',
                      lambda i: asked.append(i) or i == 1)
  stop = faults.StopRequest(agreed=True)
  assert stop.stops_after(101, 140) and stop.name == 'SIGTERM'
  assert asked == [1]
  # The last step too, on every process (only the one Ctrl-C reached
  # knows it was a Ctrl-C, and a save is made by all or none).
  last = faults.StopRequest(agreed=True)
  assert last.stops_after(140, 140)


@pytest.mark.parametrize('enabled', [True, False])
def test_several_processes_without_the_preemption_service(monkeypatch,
                                                          caplog, enabled):
  """With the service off nothing can agree on a step: a warning, no
  handler, and no call to the sync (which raised at the first step, with
  or without a workdir)."""
  monkeypatch.setattr(faults.hosts, 'count', lambda: 2)
  monkeypatch.setattr(faults.hosts, 'stop_point_available', lambda: False)
  monkeypatch.setattr(faults.hosts, 'reached_stop_point', _never)
  before = signal.getsignal(signal.SIGINT)
  with caplog.at_level('WARNING', 'orthax.train'):
    with faults.stop_signals(enabled) as stop:
      assert signal.getsignal(signal.SIGINT) is before
      assert not stop.agreed and not stop.stops_after(3, 10)
  assert 'jax_enable_preemption_service is off' in caplog.text


def test_a_ctrl_c_inside_together_stops_every_process(monkeypatch):
  """A Ctrl-C on one process while the data loads: that process reports
  its failure to the others before raising the ``KeyboardInterrupt``
  (before 2026-12-07 it raised at once, and the others waited for it at
  their next collective); a process told of another's failure raises."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from orthax.train import hosts  # pylint: disable=g-import-not-at-top
  told = []
  monkeypatch.setattr(hosts, 'count', lambda: 2)
  monkeypatch.setattr(multihost_utils, 'process_allgather',
                      lambda flag: told.append(int(flag)) or [int(flag), 1])
  with pytest.raises(KeyboardInterrupt):
    with hosts.together('the data'):
      raise KeyboardInterrupt
  assert told == [1]
  with pytest.raises(RuntimeError, match=r'the data: process\(es\) \[1\] '
                     'failed'):
    with hosts.together('the data'):
      pass
  assert told == [1, 0]


def _never(step):
  raise AssertionError(f'the sync was asked about step {step}')
