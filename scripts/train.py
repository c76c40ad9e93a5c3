"""The ``orthax-train`` command from a checkout (:mod:`orthax.cli.train`).

    python scripts/train.py --config=lm_cpu:normuon --workdir=/tmp/run
    python scripts/train.py --config=gpt2_124m --dry_run
"""

from orthax.cli import train

if __name__ == '__main__':
  train.run()
