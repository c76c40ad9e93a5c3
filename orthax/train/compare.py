"""Several optimizers on one config, same seed and data: a table (final
loss, throughput, state size) and a loss-curve plot.

For each optimizer and each learning-rate scale ``k`` the main branch's peak
learning rate is ``k ×`` the config default (a recipe's AdamW branch keeps
its own). The best scale of each optimizer (lowest final validation loss)
represents it. "Steps to AdamW" is the first evaluation step at which a run's
validation loss is at or below the best AdamW run's final validation loss
(the papers' training-efficiency measure; ``None`` if never reached).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import orthax
from orthax.train import configs
from orthax.train import trainer


def run(base_config: Any, optimizers: Sequence[str],
        lr_scales: Sequence[float] = (1.0,), *, steps: int | None = None,
        eval_every: int | None = None, progress: bool = True
        ) -> list[dict[str, Any]]:
  """Trains every (optimizer, scale); one result dict per run. The names
  and scales are checked before the first run starts."""
  check_runs(optimizers, lr_scales)
  return [train_one(base_config, name, k, steps=steps, eval_every=eval_every,
                    progress=progress)
          for name in optimizers for k in lr_scales]


def train_one(base_config: Any, name: str, lr_scale: float = 1.0, *,
              steps: int | None = None, eval_every: int | None = None,
              progress: bool = True, label: str | None = None,
              optimizer: dict[str, Any] | None = None) -> dict[str, Any]:
  """Trains ``base_config`` with optimizer ``name`` (its default section
  updated by ``optimizer``, peak learning rate × ``lr_scale``); returns the
  run's result dict
  (learning rate, final losses, tokens/s, state bytes, loss curves). A run
  whose loss or gradient turns non-finite (the trainer's
  ``FloatingPointError`` or :class:`orthax.NonFiniteGradientError`)
  returns NaN losses, empty curves and ``'diverged'``: the message."""
  cfg = copy.deepcopy(trainer.as_dict(base_config))
  opt = configs.optimizer(name).to_dict()
  opt.update(optimizer or {})
  opt['learning_rate'] *= float(lr_scale)
  cfg['optimizer'] = opt
  if steps is not None:
    cfg['train']['steps'] = int(steps)
    cfg['schedule']['warmup_steps'] = min(
        cfg['schedule']['warmup_steps'], max(int(steps) // 10, 0))
  if eval_every is not None:
    cfg['train']['eval_every'] = int(eval_every)
  result = {'optimizer': name, 'lr_scale': float(lr_scale),
            'learning_rate': opt['learning_rate']}
  try:
    out = trainer.train(cfg, None, progress=progress,
                        label=f'{name} ×{lr_scale:g} ' if label is None
                        else label)
  except (FloatingPointError, orthax.NonFiniteGradientError) as e:
    # A diverged run is a result of the sweep (the worst), not its end: a
    # non-finite loss, or (mostly first) the non-finite gradient it comes
    # with, which the trainer's train.nonfinite='raise' stops at.
    nan = float('nan')
    return dict(result, final_val_loss=nan, final_loss=nan,
                tokens_per_s=nan, opt_state_bytes=nan, eval_steps=[],
                val_loss=[], train_steps=[], train_loss=[],
                diverged=str(e))
  s = out['summary']
  return dict(
      result, final_val_loss=s['final_val_loss'],
      final_loss=s['final_loss'], tokens_per_s=s['tokens_per_s'],
      opt_state_bytes=s['opt_state_bytes'],
      eval_steps=[r['step'] for r in out['eval']],
      val_loss=[r['val_loss'] for r in out['eval']],
      train_steps=[r['step'] for r in out['train']],
      train_loss=[r['loss'] for r in out['train']])


def check_runs(optimizers: Sequence[str], lr_scales: Sequence[float]
               ) -> None:
  """Raises ``ValueError`` for an unknown optimizer or a scale that is not
  a positive number, before any training: a typo at the end of a list
  would otherwise be found after the runs before it; or an empty list of
  either (an empty table and plot, exit 0)."""
  if not optimizers or not lr_scales:
    raise ValueError('give at least one optimizer and one learning-rate '
                     f'scale, got {list(optimizers)} and {list(lr_scales)}.')
  for name in optimizers:
    configs.learning_rates(name)  # names the optimizer and the choices
  bad = [k for k in lr_scales if not (math.isfinite(k) and k > 0)]
  if bad:
    raise ValueError(f'learning-rate scales must be positive numbers, got '
                     f'{bad}.')


def best_runs(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """The lowest-final-validation-loss run of each optimizer (NaN loses)."""
  best: dict[str, dict[str, Any]] = {}
  for r in results:
    v = r['final_val_loss']
    cur = best.get(r['optimizer'])
    if cur is None or (math.isfinite(v) and not
                       (math.isfinite(cur['final_val_loss']) and
                        cur['final_val_loss'] <= v)):
      best[r['optimizer']] = r
  return best


def crossing(steps: Sequence[int], losses: Sequence[float],
             target: float) -> float | None:
  """The step at which a loss curve first reaches ``target``: linear
  between the last evaluation above it and the first at or below it (the
  first evaluation's step if that one is already there); ``None``: never.

  Example:
    >>> crossing([10, 20, 30], [3.0, 2.0, 1.5], 2.5)
    15.0
  """
  prev = None
  for s, v in zip(steps, losses):
    if v <= target:
      if prev is None:
        return float(s)
      s0, v0 = prev
      return s0 + (s - s0) * (v0 - target) / (v0 - v)
    prev = (s, v)
  return None


def steps_to(r: dict[str, Any], target: float) -> float | None:
  """Steps for run ``r``'s validation loss to reach ``target``
  (:func:`crossing`)."""
  return crossing(r['eval_steps'], r['val_loss'], target)


def table(results: list[dict[str, Any]], baseline: str = 'adamw') -> str:
  """Markdown table: every run, best scale per optimizer marked ``*``."""
  best = best_runs(results)
  target = best[baseline]['final_val_loss'] if baseline in best else None
  lines = ['| optimizer | lr | final val loss | steps to AdamW '
           f'({target:.4f}) | tokens/s | optimizer state |'
           if target is not None else
           '| optimizer | lr | final val loss | steps to AdamW | tokens/s | '
           'optimizer state |',
           '|---|---|---|---|---|---|']
  for r in results:
    mark = '*' if best[r['optimizer']] is r else ''
    st = steps_to(r, target) if target is not None else None
    lines.append(
        f"| {r['optimizer']}{mark} | {r['learning_rate']:.3g} | "
        f"{r['final_val_loss']:.4f} | {'—' if st is None else f'{st:.0f}'} | "
        f"{r['tokens_per_s']:.0f} | {r['opt_state_bytes'] / 2**20:.2f} MiB |")
  return '\n'.join(lines)


def plot(results: list[dict[str, Any]], path: str) -> None:
  """Validation (solid) and training (faint) loss of each optimizer's best
  run, saved as a PNG."""
  # A bare Figure: no pyplot state, no backend switch (safe in notebooks).
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  for name, r in best_runs(results).items():
    line, = ax.plot(r['eval_steps'], r['val_loss'], marker='o', ms=3,
                    label=f"{name} (lr {r['learning_rate']:.3g})")
    ax.plot(r['train_steps'], r['train_loss'], color=line.get_color(),
            alpha=0.25, lw=1)
  ax.set_xlabel('step')
  ax.set_ylabel('loss (nats/byte)')
  ax.set_title('validation (solid) and training (faint) loss')
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
