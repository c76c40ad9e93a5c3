"""A 1.4B-parameter GPT on one 8×H100 node (80 GiB each).

Width 2048, 24 layers (1.2B in blocks), 16 heads of 128, untied GPT-2
vocabulary (0.2B), 2048-token
context; mesh ``fsdp=4 × tensor=2`` (attention heads and MLP columns split
over tensor pairs; Newton–Schulz goes through orthax's one all-to-all per
group over both axes). 128 × 2048 tokens per step (262k), 40k steps
(≈10.5B tokens). Data as in ``gpt2_124m.py``.
"""

from orthax.train import configs


def get_config(arg: str = 'muon'):
  c = configs.base_config(arg or 'muon')
  c.hardware = 'gpu-8xh100'
  c.model.update(vocab_size=50304, seq_len=2048, d_model=2048,
                 num_layers=24, num_heads=16, dtype='bfloat16', remat=True)
  c.data.update(source='files', batch_size=128, token_dtype='uint16',
                train_path='data/fineweb10B_gpt2/train.bin',
                val_path='data/fineweb10B_gpt2/val.bin', vocab_size=50304)
  c.optimizer.update(learning_rate=0.02 if arg != 'adamw' else 3e-4,
                     adam_learning_rate=3e-4 if arg != 'adamw' else None,
                     weight_decay=0.0 if arg != 'adamw' else 0.1)
  c.schedule.update(kind='linear', warmup_steps=1000, final_fraction=0.0)
  c.mesh.update(data=1, fsdp=4, tensor=2)
  c.train.update(steps=40000, log_every=50, eval_every=1000,
                 eval_batches=20, checkpoint_every=1000)
  return c
