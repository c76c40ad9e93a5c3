"""The embedded default: a byte-level GPT (0.85M parameters, 4 layers of
width 128, RoPE) on the text of Python's own documentation
(``pydoc_data``), 200 steps of 16×128 bytes: about two minutes on 2 CPU
cores.

``--config=lm_cpu:<optimizer>`` picks ``adamw`` or any registered
orthax recipe (``muon`` default, ``normuon``, ``namo``, ``namo_d``,
``spectra``, ``root``, ``auon``, ``hybrid_auon``, ``lanton``, ``aro``,
``fismo``, ``dct_adamw``, ``trion``: ``orthax.recipe_names()``);
``--config.optimizer.learning_rate=0.01`` etc. override single keys.
"""

from orthax.train import configs


def get_config(arg: str = 'muon'):
  return configs.base_config(arg or 'muon')
