"""orthax.train.metrics.Progress: the line keeps the last logged values
between log points, shows an ETA from the pace after the first step, and
redraws in place on a terminal and in Jupyter (one line per log point
elsewhere)."""

from __future__ import annotations

import io

from orthax.train import metrics


class Tty(io.StringIO):

  def isatty(self):
    return True


class Clock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_terminal_keeps_the_loss_between_log_points_and_shows_an_eta():
  out, clock = Tty(), Clock()
  bar = metrics.Progress(10, stream=out, clock=clock)
  bar.update(1, {'loss': 5.5, 'tok/s': 100.0}, force=True)  # after compile
  clock.now += 4.0
  bar.update(3, {})  # 2 s per step since step 1, 7 steps left
  frames = out.getvalue().split('\r')[1:]
  assert len(frames) == 2
  assert 'loss 5.5' in frames[1] and 'tok/s 100' in frames[1]
  assert 'eta 0:14' in frames[1] and 'eta' not in frames[0]
  clock.now += 2.0
  bar.update(4, {'loss': 5.0, 'val': 5.2, 'tok/s': 120.0}, force=True)
  bar.update(5, {'loss': 4.9, 'tok/s': 121.0}, force=True)
  last = out.getvalue().split('\r')[-1]
  assert 'loss 4.9' in last and 'val 5.2' in last  # val kept until the next
  bar.update(10, {}, force=True)
  assert 'eta' not in out.getvalue().split('\r')[-1]  # done
  bar.close()
  assert out.getvalue().endswith('\n')


def test_a_log_file_gets_one_line_per_log_point():
  out = io.StringIO()
  bar = metrics.Progress(4, stream=out, label='muon ')
  bar.update(1, {'loss': 5.0})
  bar.update(2, {'loss': 4.0}, force=True)
  bar.update(3, {})
  lines = out.getvalue().splitlines()
  assert len(lines) == 1
  assert lines[0].startswith('muon [') and 'loss 4' in lines[0]


def test_jupyter_streams_redraw_in_place():
  stream_type = type('OutStream', (io.StringIO,),
                     {'__module__': 'ipykernel.iostream'})
  out = stream_type()
  bar = metrics.Progress(4, stream=out)
  bar.update(1, {'loss': 5.0})
  bar.update(2, {})
  assert out.getvalue().count('\r') == 2 and '\n' not in out.getvalue()


def test_disabled_writes_nothing():
  out = Tty()
  bar = metrics.Progress(4, stream=out, enabled=False)
  bar.update(1, {'loss': 5.0}, force=True)
  bar.close()
  assert out.getvalue() == ''


def test_throughput_counts_from_the_first_step_and_leaves_out_paused_time():
  clock = Clock()
  rate = metrics.Throughput(1000, clock=clock)
  assert rate.rate() != rate.rate()  # NaN before any step
  clock.now += 30.0  # the first step compiles: not counted
  rate.tick({})
  clock.now += 2.0
  assert rate.rate() != rate.rate()  # NaN, not 0, before a second step
  rate.tick({})
  rate.tick({})
  with rate.paused():  # e.g. an evaluation
    clock.now += 50.0
  clock.now += 2.0
  assert rate.rate() == 2000 / 4.0
  try:
    with rate.paused():
      clock.now += 7.0
      raise KeyError('a failure inside still counts as paused')
  except KeyError:
    pass
  assert rate.rate() == 2000 / 4.0


def test_unknown_fields_are_left_out_and_large_ones_shown_whole():
  """The first record's tok/s is NaN (one step seen: it read 0 before);
  thousands are shown as whole numbers (10759, not 1.076e+04)."""
  out = io.StringIO()
  bar = metrics.Progress(10, stream=out)
  bar.update(1, {'loss': 5.5, 'tok/s': float('nan')}, force=True)
  bar.update(2, {'loss': 5.25, 'tok/s': 10759.4}, force=True)
  first, second = out.getvalue().splitlines()
  assert 'tok/s' not in first and 'nan' not in first, first
  assert 'tok/s 10759' in second and 'loss 5.25' in second, second


def test_fields_keep_the_callers_order_whichever_comes_first():
  """A skipped first step has no loss yet (and the val field comes on
  evaluations only): a field seen later still takes its place in the
  caller's order, and keeps it."""
  out = io.StringIO()
  bar = metrics.Progress(10, stream=out)
  bar.update(1, {'tok/s': 100.0, 'mfu': 0.25}, force=True)
  bar.update(2, {'loss': 5.5, 'tok/s': 110.0, 'mfu': 0.25}, force=True)
  bar.update(3, {'loss': 5.0, 'val': 5.1, 'tok/s': 120.0, 'mfu': 0.3},
             force=True)
  bar.update(4, {'loss': 4.9, 'tok/s': 130.0, 'mfu': 0.3}, force=True)
  names = [[w for w in line.split('  ')[1:] if w]
           for line in out.getvalue().splitlines()]
  keys = [[w.split()[0] for w in n if not w.startswith('eta')]
          for n in names]
  assert keys == [['tok/s', 'mfu'], ['loss', 'tok/s', 'mfu'],
                  ['loss', 'val', 'tok/s', 'mfu'],
                  ['loss', 'val', 'tok/s', 'mfu']], keys
