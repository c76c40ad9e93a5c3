"""Each ``reference=`` mode at its reference's own learning rates, trained
on the sweep's setting, against the library mode at its default.

A recipe's ``reference=`` modes run at the rates their reference code
trains with (:class:`orthax.recipes.ModeRates`); the library mode
(``'orthax'``) at the rates the learning-rate sweep chose. :func:`run`
trains every mode that has rates of its own (resumable, like
:func:`orthax.train.sweep.run`); :func:`table` sets each beside the library
mode's sweep run at the same width and seed, so that the README can say
what a paper's rate gives on the embedded corpus.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import orthax
from orthax.train import compare
from orthax.train import metrics
from orthax.train import sweep


def cases(optimizers: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """``{optimizer, reference, learning_rate, adam_learning_rate, source}``
  of every mode with its reference's own rates (of ``optimizers`` only,
  where given), read off the built optimizer (the AdamW branch's as the
  mode resolves it)."""
  out = []
  for name in optimizers or orthax.recipe_names():
    for ref, rates in orthax.recipes.recipe_entry(name).mode_rates.items():
      lrs = orthax.recipes.recipe_routing(
          orthax.recipe(name, reference=ref)).learning_rates
      out.append(dict(optimizer=name, reference=ref,
                      learning_rate=float(lrs['matrix']),
                      adam_learning_rate=float(lrs['adam']),
                      source=rates.source))
  return out


def _key(r: dict[str, Any]) -> tuple:
  return (r['optimizer'], r['reference'], int(r['width']), int(r['seed']),
          sweep.rate_key(r['learning_rate']),
          sweep.rate_key(r['adam_learning_rate']))


def run(base_config: Any, out_dir: str, *, widths: Sequence[int],
        seeds: Sequence[int], optimizers: Sequence[str] | None = None,
        steps: int | None = None, eval_every: int | None = 25,
        max_runs: int | None = None, progress: bool = True
        ) -> list[dict[str, Any]]:
  """Trains each of :func:`cases` ``(optimizers)`` at every width and seed
  not yet in ``<out_dir>/runs.jsonl`` (at most ``max_runs`` of them; 0:
  none, only read), appending each as it ends; returns the records of those
  cases."""
  sweep.check_max_runs(max_runs)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, 'runs.jsonl')
  wanted = [dict(c, width=int(w), seed=int(s)) for c in cases(optimizers)
            for w in widths for s in seeds]
  records = sweep.load(path)
  metrics.drop_cut_line(path, records)
  done = {_key(r) for r in records}
  todo = [c for c in wanted if _key(c) not in done][:max_runs]
  for i, case in enumerate(todo):
    t0 = time.perf_counter()
    rec = compare.train_one(
        sweep.config_for(base_config, case['width'], case['seed']),
        case['optimizer'], steps=steps, eval_every=eval_every,
        progress=progress,
        label=(f"[{i + 1}/{len(todo)}] {case['optimizer']} "
               f"{case['reference']} d{case['width']} s{case['seed']} "),
        optimizer=dict(learning_rate=case['learning_rate'],
                       adam_learning_rate=case['adam_learning_rate'],
                       kwargs={'reference': case['reference']}))
    rec.update(case, seconds=round(time.perf_counter() - t0, 1))
    with open(path, 'a') as f:
      f.write(metrics.json_line(rec))
  keys = {_key(c) for c in wanted}
  return [r for r in sweep.load(path) if _key(r) in keys]


def table(mode_runs: Sequence[dict[str, Any]],
          sweep_runs: Sequence[dict[str, Any]]) -> str:
  """Markdown: per mode run, its rates and final validation loss, and the
  library mode's at its default rate (the sweep's run of the same recipe,
  width and seed at today's default; ``—`` where there is none)."""
  library = {(r['optimizer'], int(r['width']), int(r['seed'])): r
             for r in sweep_runs
             if sweep.rate_key(r['learning_rate']) == sweep.rate_key(
                 sweep.default_learning_rate(r['optimizer']))}
  lines = ['| recipe | mode | η / AdamW η | source | loss | '
           "library mode's loss (η) |", '|---|---|---|---|---|---|']
  for r in sorted(mode_runs, key=lambda r: (r['optimizer'], r['reference'],
                                            r['width'], r['seed'])):
    lib = library.get((r['optimizer'], int(r['width']), int(r['seed'])))
    ours = ('—' if lib is None else
            f"{lib['final_val_loss']:.4f} ({lib['learning_rate']:g})")
    lines.append(
        f"| {r['optimizer']} | {r['reference']} | "
        f"{r['learning_rate']:g} / {r['adam_learning_rate']:g} | "
        f"{r['source']} | {r['final_val_loss']:.4f} | {ours} |")
  return '\n'.join(lines)
