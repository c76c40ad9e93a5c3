"""The ``orthax-sweep`` command from a checkout (:mod:`orthax.cli.sweep`).

    python scripts/sweep.py                                     # everything
    python scripts/sweep.py --optimizers=adamw,muon --max_runs=10
    python scripts/sweep.py --summarize_only                    # table and plots
"""

from orthax.cli import sweep

if __name__ == '__main__':
  sweep.run()
