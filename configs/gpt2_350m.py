"""GPT-2 medium (350M) on a TPU v4-64 pod slice (32 chips, 32 GiB each).

Mesh ``data=2 × fsdp=16``: two FSDP replicas of 16 chips (parameters and
optimizer state sharded 16 ways, the batch 32 ways); 512 × 1024 GPT-2
tokens per step, 14k steps (≈7.3B tokens). Data as in ``gpt2_124m.py``.
"""

from orthax.train import configs


def get_config(arg: str = 'muon'):
  c = configs.base_config(arg or 'muon')
  c.hardware = 'tpu-v4-64'
  c.model.update(vocab_size=50304, seq_len=1024, d_model=1024,
                 num_layers=24, num_heads=16, dtype='bfloat16', remat=True)
  c.data.update(source='files', batch_size=512, token_dtype='uint16',
                train_path='data/fineweb10B_gpt2/train.bin',
                val_path='data/fineweb10B_gpt2/val.bin', vocab_size=50304)
  c.optimizer.update(learning_rate=0.02 if arg != 'adamw' else 3e-4,
                     adam_learning_rate=3e-4 if arg != 'adamw' else None,
                     weight_decay=0.0 if arg != 'adamw' else 0.1)
  c.schedule.update(kind='linear', warmup_steps=700, final_fraction=0.0)
  c.mesh.update(data=2, fsdp=16, tensor=1)
  c.train.update(steps=14000, log_every=50, eval_every=1000,
                 eval_batches=20, checkpoint_every=1000)
  return c
