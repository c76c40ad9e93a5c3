"""GPT-2 small (124M) on a TPU v5e-16 slice (16 chips, 16 GiB HBM each).

FSDP over all 16 chips; 256 sequences of 1024 GPT-2 tokens per step
(262k tokens), 20k steps (≈5.2B tokens, ~Chinchilla×2). Data: GPT-2 token
files (uint16 ``.bin``, e.g. FineWeb tokenized with tiktoken's ``gpt2``):
set ``--config.data.train_path`` / ``val_path``.
``:<optimizer>`` as in ``lm_cpu.py``.
"""

from orthax.train import configs


def get_config(arg: str = 'muon'):
  c = configs.base_config(arg or 'muon')
  c.hardware = 'tpu-v5e-16'
  c.model.update(vocab_size=50304, seq_len=1024, d_model=768, num_layers=12,
                 num_heads=12, dtype='bfloat16', remat=True)
  c.data.update(source='files', batch_size=256, token_dtype='uint16',
                train_path='data/fineweb10B_gpt2/train.bin',
                val_path='data/fineweb10B_gpt2/val.bin', vocab_size=50304)
  c.optimizer.update(learning_rate=0.02 if arg != 'adamw' else 6e-4,
                     adam_learning_rate=6e-4 if arg != 'adamw' else None,
                     weight_decay=0.0 if arg != 'adamw' else 0.1)
  c.schedule.update(kind='linear', warmup_steps=700, final_fraction=0.0)
  c.mesh.update(data=1, fsdp=16, tensor=1)
  c.train.update(steps=20000, log_every=50, eval_every=1000,
                 eval_batches=20, checkpoint_every=1000)
  return c
