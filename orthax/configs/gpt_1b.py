"""A 1.4B-parameter GPT on one 8×H100 node (80 GiB each).

Width 2048, 24 layers (1.2B in blocks), 16 heads of 128, untied GPT-2
vocabulary (0.2B), 2048-token context; mesh ``fsdp=4 × tensor=2``
(attention heads and MLP columns split over tensor pairs; Newton–Schulz
goes through orthax's one all-to-all per group over both axes). 128 × 2048 tokens per step (262k), 40k steps
(≈10.5B tokens). Data as in ``gpt2_124m.py``.
"""

from orthax.train import configs


def get_config(arg: str = 'muon'):
  return configs.pretraining_config(
      arg or 'muon', hardware='gpu-8xh100',
      model=dict(seq_len=2048, d_model=2048, num_layers=24, num_heads=16),
      mesh=dict(data=1, fsdp=4, tensor=2), batch_size=128, steps=40000,
      warmup_steps=1000, adamw_learning_rate=3e-4)
