"""GPT-2 small (124M, tied embeddings) on a TPU v5e-16 slice (16 chips,
16 GiB HBM each).

FSDP over all 16 chips; 256 sequences of 1024 GPT-2 tokens per step
(262k tokens), 20k steps (≈5.2B tokens, ~Chinchilla×2). Data: GPT-2 token
files (uint16 ``.bin``, e.g. FineWeb tokenized with tiktoken's ``gpt2``):
set ``--config.data.train_path`` / ``val_path``.
``:<optimizer>`` as in ``lm_cpu.py``. The slice is four hosts of four
chips: run ``orthax-train --config=gpt2_124m --multihost --workdir=<shared>``
on each.
"""

from orthax.train import configs


def get_config(arg: str = 'muon'):
  return configs.pretraining_config(
      arg or 'muon', hardware='tpu-v5e-16',
      model=dict(seq_len=1024, d_model=768, num_layers=12, num_heads=12,
                 tie_embeddings=True),
      mesh=dict(data=1, fsdp=16, tensor=1), batch_size=256, steps=20000,
      warmup_steps=700, adamw_learning_rate=6e-4)
