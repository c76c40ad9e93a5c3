"""The ``orthax-compare`` command from a checkout (:mod:`orthax.cli.compare`).

    python scripts/compare.py                                   # the table in docs/training.md
    python scripts/compare.py --optimizers=adamw,muon --lr_scales=1 --steps=100
"""

from orthax.cli import compare

if __name__ == '__main__':
  compare.run()
