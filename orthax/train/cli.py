"""What the command-line scripts (``scripts/*.py``, absl apps) share."""

from __future__ import annotations

import logging

from absl import flags
from absl import logging as absl_logging


def quiet_library_logs() -> None:
  """WARNING and above from the libraries unless ``--verbosity`` was given.

  Under ``absl.app`` every INFO line of JAX (its probing for a TPU backend)
  and orbax (about 40 per checkpoint) reaches the terminal and breaks the
  progress line. This raises absl's verbosity to WARNING when the command
  line did not set it, and keeps the trainer's own INFO notes
  (``orthax.train``: e.g. which checkpoint a run resumed from).
  """
  if not flags.FLAGS['verbosity'].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('orthax.train').setLevel(logging.INFO)
