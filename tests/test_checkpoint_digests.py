"""The checksum record is written off the training thread: once orbax has
committed a step, ``Checkpointer.seal_if_written`` (called every step)
starts the hashing and returns; the next save, a restore and ``close`` wait
for it, and an error it raised is raised there."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip('orbax.checkpoint')

from orthax.train import checkpoint  # noqa: E402
from orthax.train import checkpoint_digests  # noqa: E402


def _state():
  return {'w': np.arange(64.0, dtype=np.float32).reshape(8, 8),
          'b': np.zeros(8, np.float32)}


def _start_sealing(ck, step):
  """Saves ``step`` and asks for its record until the hashing has begun."""
  ck.save(step, _state(), force=True)
  ck._mgr.wait_until_finished()  # pylint: disable=protected-access
  ck.seal_if_written()


def test_the_record_is_written_while_the_caller_goes_on(tmp_path,
                                                        monkeypatch):
  release, started = threading.Event(), threading.Event()
  real = checkpoint.file_digests

  def slow_digests(step_dir):
    started.set()
    assert release.wait(30)
    return real(step_dir)

  monkeypatch.setattr(checkpoint, 'file_digests', slow_digests)
  ck = checkpoint.Checkpointer(str(tmp_path / 'ck'), every=1)
  t0 = time.monotonic()
  _start_sealing(ck, 1)
  assert started.wait(30)
  # The caller got control back while the hashing waits.
  record = tmp_path / 'ck' / '1' / checkpoint_digests.CHECKSUMS
  assert not record.exists()
  assert time.monotonic() - t0 < 25
  release.set()
  ck.close()  # waits for the record
  assert record.exists()
  assert checkpoint_digests.check_files(str(tmp_path / 'ck' / '1')) == []


def test_the_next_save_waits_for_the_record(tmp_path, monkeypatch):
  """With ``max_to_keep=1`` the next save deletes the step being hashed:
  it must wait for the record first."""
  ck = checkpoint.Checkpointer(str(tmp_path / 'ck'), every=1, max_to_keep=1)
  done = []
  real = checkpoint.file_digests

  def digests(step_dir):
    time.sleep(0.3)
    out = real(step_dir)
    done.append(step_dir)
    return out

  monkeypatch.setattr(checkpoint, 'file_digests', digests)
  _start_sealing(ck, 1)
  ck.save(2, _state(), force=True)
  assert len(done) == 1  # step 1's record was finished before step 2
  ck.close()
  assert ck.all_steps() == [2]
  assert checkpoint_digests.check_files(str(tmp_path / 'ck' / '2')) == []


def test_an_error_while_hashing_is_raised_where_it_is_waited_for(
    tmp_path, monkeypatch):
  def broken(step_dir):
    raise OSError(f'disk gone under {step_dir}')

  monkeypatch.setattr(checkpoint, 'file_digests', broken)
  ck = checkpoint.Checkpointer(str(tmp_path / 'ck'), every=1)
  _start_sealing(ck, 1)
  with pytest.raises(OSError, match='disk gone'):
    ck.close()


def test_a_failed_save_is_raised_before_any_record(tmp_path, monkeypatch):
  """Orbax clears its in-progress flag even when its background write
  failed; the error is taken (and raised) on the training thread before
  the hashing starts, so the failed step gets no record."""
  ck = checkpoint.Checkpointer(str(tmp_path / 'ck'), every=1)
  ck.save(1, _state(), force=True)
  ck._mgr.wait_until_finished()  # pylint: disable=protected-access

  def failed():
    raise OSError('async write failed (disk full)')

  monkeypatch.setattr(ck._mgr, 'wait_until_finished', failed)  # pylint: disable=protected-access
  with pytest.raises(OSError, match='disk full'):
    ck.seal_if_written()
  assert ck._sealer is None  # pylint: disable=protected-access
  assert not (tmp_path / 'ck' / '1' / checkpoint_digests.CHECKSUMS).exists()
