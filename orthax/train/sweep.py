"""Learning-rate sweeps across recipes, model widths and seeds, resumable.

Every run is one :func:`orthax.train.compare.train_one` of the base config
with the model's ``d_model`` set to a width, ``seed`` set, and the
optimizer's default peak learning rate times a scale. Finished runs are
appended to ``<out>/runs.jsonl`` as they end, so a sweep stopped at any
point (a session ending, a crash) continues where it stopped when run
again with the same arguments: runs already in the file are not repeated.
A run is known by its optimizer, width, seed and *absolute* peak learning
rate, so a default that changes later keeps the runs already made: the
scale ``×1`` of the new default is the run at that rate, if there is one.

:func:`summarize` turns the runs into one row per (optimizer, width): the
best scale (lowest final validation loss averaged over seeds), the loss at
the default and at the best, and the steps to reach AdamW's best final
loss at that width (on the seed-averaged validation curve).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from typing import Any, Iterable, Sequence

import numpy as np

from orthax.train import compare
from orthax.train import configs
from orthax.train import metrics
from orthax.train import trainer


@dataclasses.dataclass(frozen=True)
class SweepSpec:
  """What to run: every optimizer × width × seed × learning-rate scale."""
  optimizers: tuple[str, ...]
  scales: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
  widths: tuple[int, ...] = (128, 256)
  seeds: tuple[int, ...] = (0, 1)
  steps: int | None = None
  eval_every: int | None = 25

  def keys(self) -> list[tuple[str, int, int, float]]:
    """``(optimizer, width, seed, scale)`` of every run, widths outermost
    within an optimizer so that a partial sweep covers whole widths."""
    return [(o, w, s, float(k)) for o in self.optimizers
            for w in self.widths for s in self.seeds for k in self.scales]

  def run_keys(self) -> list[tuple[str, int, int, float]]:
    """:meth:`keys` with each scale turned into the peak learning rate
    it means today (``scale ×`` the optimizer's default): what
    :func:`run_key` gives the record of that run."""
    return [(o, w, s, rate_key(default_learning_rate(o) * k))
            for o, w, s, k in self.keys()]


def default_learning_rate(name: str) -> float:
  """Optimizer ``name``'s default peak learning rate (its main branch's)
  in the trainer."""
  return float(configs.learning_rates(name)[0])


def rate_key(learning_rate: float) -> float:
  """``learning_rate`` to 6 significant digits: ``0.02 × 2`` and ``0.04``
  are one rate."""
  return float(f'{float(learning_rate):.6g}')


def run_key(record: dict[str, Any]) -> tuple[str, int, int, float]:
  """``(optimizer, width, seed, peak learning rate)`` of a recorded run."""
  return (record['optimizer'], int(record['width']), int(record['seed']),
          rate_key(record['learning_rate']))


def load(path: str) -> list[dict[str, Any]]:
  """The runs recorded in ``path``: :func:`orthax.train.metrics.read_jsonl`
  (none if the file does not exist; a last line cut short by a crash is
  dropped)."""
  return metrics.read_jsonl(path)


def config_for(base_config: Any, width: int, seed: int) -> dict[str, Any]:
  """``base_config`` with ``model.d_model = width`` and ``seed``."""
  cfg = copy.deepcopy(trainer.as_dict(base_config))
  heads = int(cfg['model']['num_heads'])
  if width % heads:
    raise ValueError(f'width {width} is not a multiple of '
                     f'model.num_heads={heads}.')
  cfg['model']['d_model'] = int(width)
  cfg['seed'] = int(seed)
  return cfg


def check_max_runs(max_runs: int | None) -> None:
  """``None`` or an int ``>= 0`` (``todo[:-1]`` ran all runs but the
  last)."""
  if max_runs is not None and (isinstance(max_runs, bool)
                               or not isinstance(max_runs, int)
                               or max_runs < 0):
    raise ValueError(f'max_runs must be an int >= 0 or None, got '
                     f'{max_runs!r}.')


def run(base_config: Any, spec: SweepSpec, out_dir: str, *,
        progress: bool = True, max_runs: int | None = None
        ) -> list[dict[str, Any]]:
  """Trains every run of ``spec`` not yet in ``<out_dir>/runs.jsonl``
  (at most ``max_runs`` of them), appending each when it ends; returns all
  recorded runs of ``spec``."""
  compare.check_runs(spec.optimizers, spec.scales)
  check_max_runs(max_runs)
  os.makedirs(out_dir, exist_ok=True)
  check_same_sweep(base_config, spec, out_dir)
  path = os.path.join(out_dir, 'runs.jsonl')
  records = load(path)
  metrics.drop_cut_line(path, records)
  done = {run_key(r) for r in records}
  todo = [k for k, rk in zip(spec.keys(), spec.run_keys()) if rk not in done]
  for i, (name, width, seed, scale) in enumerate(todo[:max_runs]):
    t0 = time.perf_counter()
    rec = compare.train_one(
        config_for(base_config, width, seed), name, scale, steps=spec.steps,
        eval_every=spec.eval_every, progress=progress,
        label=f'[{i + 1}/{len(todo)}] {name} d{width} s{seed} ×{scale:g} ')
    rec.update(width=int(width), seed=int(seed),
               seconds=round(time.perf_counter() - t0, 1))
    with open(path, 'a') as f:
      f.write(metrics.json_line(rec))
  wanted = set(spec.run_keys())
  return [r for r in load(path) if run_key(r) in wanted]


def recorded(base_config: Any, spec: SweepSpec, out_dir: str
             ) -> list[dict[str, Any]]:
  """Every run in ``<out_dir>/runs.jsonl`` of ``spec``'s optimizers,
  widths and seeds, at whatever rate it was made (a sweep of the same
  setup: see :func:`check_same_sweep`).

  Raises:
    ValueError: ``out_dir`` holds no ``runs.jsonl``.
  """
  if not os.path.exists(os.path.join(out_dir, 'runs.jsonl')):
    raise ValueError(f'{out_dir!r} holds no sweep: no runs.jsonl there.')
  check_same_sweep(base_config, spec, out_dir)
  return [r for r in load(os.path.join(out_dir, 'runs.jsonl'))
          if r['optimizer'] in spec.optimizers
          and int(r['width']) in spec.widths and int(r['seed']) in spec.seeds]


def check_same_sweep(base_config: Any, spec: SweepSpec, out_dir: str
                     ) -> None:
  """Records in ``<out_dir>/sweep.json`` what every run shares (the base
  config less width, seed and optimizer; steps; evaluation interval), or,
  when it exists, raises ``ValueError`` naming what differs: runs of
  another setup must not be mixed into one summary."""
  cfg = trainer.as_dict(base_config)
  shared = {k: v for k, v in cfg.items() if k not in ('seed', 'optimizer')}
  shared['model'] = {k: v for k, v in cfg['model'].items()
                     if k != 'd_model'}
  meta = json.loads(json.dumps({'config': shared, 'steps': spec.steps,
                                'eval_every': spec.eval_every}))
  path = os.path.join(out_dir, 'sweep.json')
  if not os.path.exists(path):
    with open(path, 'w') as f:
      json.dump(meta, f, indent=1, sort_keys=True)
    return
  with open(path) as f:
    old = json.load(f)
  if old != meta:
    diff = sorted(_differences(old, meta))
    raise ValueError(f'{out_dir} holds a sweep of another setup (differs in '
                     f'{", ".join(diff)}); use another out directory.')


def _differences(a: Any, b: Any, prefix: str = '') -> list[str]:
  """Dotted paths where ``a`` (recorded) and ``b`` (this run) differ; a key
  that only one of them has is named with the side that has it."""
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      if k not in a or k not in b:
        side = 'recorded' if k in a else 'this run'
        out.append(f'{prefix}{k} (only in {side})')
      else:
        out.extend(_differences(a[k], b[k], f'{prefix}{k}.'))
    return out
  return [] if a == b else [prefix.rstrip('.')]


def _mean_curve(runs: Sequence[dict[str, Any]]) -> tuple[list, list]:
  """Evaluation steps and the seed-mean validation loss at each."""
  steps = runs[0]['eval_steps']
  vals = np.mean([r['val_loss'][:len(steps)] for r in runs], axis=0)
  return steps, [float(v) for v in vals]


def _by_scale(runs: Iterable[dict[str, Any]], default: float | None = None
              ) -> dict[float, list]:
  """Runs by their multiple of ``default`` (``None``: the ``lr_scale``
  they were run at)."""
  out: dict[float, list] = {}
  for r in runs:
    scale = (float(r['lr_scale']) if default is None
             else rate_key(r['learning_rate'] / default))
    out.setdefault(scale, []).append(r)
  return dict(sorted(out.items()))


def _compared(scales: dict[float, list]) -> list[float]:
  """The scales run at every seed of the group: seed means are compared
  only over the same seeds (a scale run at one seed of two is plotted and
  tabled, but cannot be the best); every scale where none was (runs made
  at other defaults, read back by ``--summarize_only``)."""
  seeds = {r['seed'] for v in scales.values() for r in v}
  full = [k for k, v in scales.items() if {r['seed'] for r in v} == seeds]
  return full or list(scales)


def _final(runs: Sequence[dict[str, Any]]) -> float:
  v = [r['final_val_loss'] for r in runs]
  return float(np.mean(v)) if all(map(math.isfinite, v)) else math.inf


def summarize(records: Sequence[dict[str, Any]], baseline: str = 'adamw',
              defaults: dict[str, float] | None = None
              ) -> list[dict[str, Any]]:
  """One row per (optimizer, width) of ``records``: ``best_scale`` (among
  ``compared_scales``, those run at every seed of the group, or all where
  none was), ``best_lr``, ``default_lr``, ``loss_default`` and ``loss_best`` (seed
  means), ``seeds``, ``steps_to_baseline``: the step at which the
  seed-mean validation curve at the default scale reaches the baseline's
  best seed-mean final loss at that width (again among scales run at every
  seed; linear between evaluations, :func:`orthax.train.compare.crossing`;
  ``None``: never, or no baseline runs), ``steps_to_baseline_by_seed``
  (``{seed: step or None}``: each seed's own curve against the same
  target) and ``baseline_steps``: the baseline's training steps at that
  width.

  Scales are multiples of ``defaults[name]`` where given (today's defaults,
  which may differ from those the runs were made at), else the
  ``lr_scale`` each run was made at."""
  defaults = defaults or {}
  groups: dict[tuple[str, int], list] = {}
  for r in records:
    groups.setdefault((r['optimizer'], int(r['width'])), []).append(r)
  target, baseline_steps = {}, {}
  for (name, width), runs in groups.items():
    if name == baseline:
      scales = _by_scale(runs, defaults.get(name))
      # Only a finite target: where every baseline scale has a diverged
      # seed there is none to reach (inf would be "reached" at once).
      best = min((_final(scales[k]) for k in _compared(scales)),
                 default=math.inf)
      steps = [r['eval_steps'][-1] for r in runs if r['eval_steps']]
      if math.isfinite(best) and steps:
        target[width], baseline_steps[width] = best, max(steps)
  rows = []
  for (name, width), runs in sorted(groups.items()):
    scales = _by_scale(runs, defaults.get(name))
    finals = {k: _final(v) for k, v in scales.items()}
    compared = _compared(scales)
    best = min(compared, key=finals.get)
    default = scales.get(1.0)
    steps_to, by_seed = None, {}
    if (default is not None and width in target
        and math.isfinite(finals[1.0])):  # a diverged seed: never reached
      steps_to = compare.crossing(*_mean_curve(default), target[width])
      by_seed = {r['seed']: compare.steps_to(r, target[width])
                 for r in default}
    lr_of = {k: v[0]['learning_rate'] for k, v in scales.items()}
    rows.append({
        'optimizer': name, 'width': width, 'best_scale': best,
        'best_lr': lr_of[best],
        'default_lr': defaults.get(name, lr_of[1.0] if default
                                   else lr_of[best] / best),
        'loss_default': finals.get(1.0, math.nan), 'loss_best': finals[best],
        'loss_by_scale': finals, 'compared_scales': compared,
        'seeds': sorted({r['seed'] for r in runs}),
        'steps_to_baseline': steps_to, 'steps_to_baseline_by_seed': by_seed,
        'baseline_loss': target.get(width),
        'baseline_steps': baseline_steps.get(width),
    })
  return rows


def _format_steps(row: dict[str, Any]) -> str:
  """``123 (0.61×; 0.58–0.65)``: the seed-mean curve's crossing, its ratio
  to the baseline's steps, and the range of each seed's own (where there are
  several and all reach the target); ``—``: never reached."""
  if row['steps_to_baseline'] is None:
    return '—'
  total = row['baseline_steps']
  out = (f"{row['steps_to_baseline']:.0f} "
         f"({row['steps_to_baseline'] / total:.2f}×")
  seeds = list(row.get('steps_to_baseline_by_seed', {}).values())
  if len(seeds) > 1 and None not in seeds:
    out += f'; {min(seeds) / total:.2f}–{max(seeds) / total:.2f}'
  return out + ')'


def table(rows: Sequence[dict[str, Any]]) -> str:
  """Markdown: one line per optimizer, its widths side by side."""
  widths = sorted({r['width'] for r in rows})
  names = list(dict.fromkeys(r['optimizer'] for r in rows))
  at = {(r['optimizer'], r['width']): r for r in rows}
  per_w = lambda fmt, key: ' / '.join(
      (fmt(at[(n, w)][key]) if key else fmt(at[(n, w)])) if (n, w) in at
      else '—' for w in widths)
  ws = ' / '.join(map(str, widths))
  lines = [f'| optimizer | default lr | best lr (d {ws}) | loss at default | '
           f'loss at best | steps to AdamW at default (× AdamW\'s; each '
           'seed\'s) | seeds |',
           '|---|---|---|---|---|---|---|']
  for n in names:
    first = next(at[(n, w)] for w in widths if (n, w) in at)
    fmt_loss = lambda v: '—' if math.isnan(v) else f'{v:.4f}'  # not run
    lines.append(
        f"| {n} | {first['default_lr']:.3g} | "
        f"{per_w(lambda v: f'{v:.3g}', 'best_lr')} | "
        f"{per_w(fmt_loss, 'loss_default')} | "
        f"{per_w(fmt_loss, 'loss_best')} | "
        f"{per_w(_format_steps, None)} | "
        f"{per_w(lambda v: ','.join(map(str, v)), 'seeds')} |")
  return '\n'.join(lines)


def _draw(ax: Any, rows: Sequence[dict[str, Any]], name: str) -> None:
  """Optimizer ``name``'s final validation loss against learning rate on
  ``ax``, one line per width of its ``rows``, the default marked."""
  for r in (r for r in rows if r['optimizer'] == name):
    ks = list(r['loss_by_scale'])
    lrs = [r['default_lr'] * k for k in ks]
    line, = ax.plot(lrs, [r['loss_by_scale'][k] for k in ks], marker='o',
                    label=f"d_model {r['width']}")
    if 1.0 in r['loss_by_scale']:
      ax.plot([r['default_lr']], [r['loss_by_scale'][1.0]], marker='*',
              ms=12, color=line.get_color())
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  ax.set_xscale('log')
  # Ticks at 1, 2 and 5 of each decade, labelled plainly (a narrow range
  # still gets a label; minor ticks none, which would overlap).
  ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1, 2, 5)))
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f'{x:g}'))
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  ax.set_title(name)
  ax.grid(alpha=0.3)


def plot(rows: Sequence[dict[str, Any]], out_dir: str) -> list[str]:
  """``<out_dir>/lr_<optimizer>.png`` per optimizer: final validation loss
  against learning rate, one line per width, the default marked."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  paths = []
  for name in dict.fromkeys(r['optimizer'] for r in rows):
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    _draw(ax, rows, name)
    ax.set_xlabel('peak learning rate (★ default)')
    ax.set_ylabel('final validation loss')
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, f'lr_{name}.png')
    fig.savefig(path, dpi=110)
    paths.append(path)
  return paths


def plot_grid(rows: Sequence[dict[str, Any]], path: str,
              columns: int = 4) -> str:
  """Every optimizer of ``rows`` in one figure at ``path``, a panel each
  (as :func:`plot` draws them), for the docs."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  names = list(dict.fromkeys(r['optimizer'] for r in rows))
  lines = -(-len(names) // columns)
  fig = Figure(figsize=(3.2 * columns, 2.6 * lines))
  axes = fig.subplots(lines, columns, squeeze=False).ravel()
  for ax, name in zip(axes, names):
    _draw(ax, rows, name)
  for ax in axes[len(names):]:
    ax.set_visible(False)
  axes[0].legend(fontsize='small')
  fig.supxlabel('peak learning rate (★ default)')
  fig.supylabel('final validation loss')
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  return path
