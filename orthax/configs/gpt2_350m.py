"""GPT-2 medium (350M, tied embeddings) on a TPU v4-64 pod slice (32
chips, 32 GiB each).

Mesh ``data=2 × fsdp=16``: two FSDP replicas of 16 chips (parameters and
optimizer state sharded 16 ways, the batch 32 ways); 512 × 1024 GPT-2
tokens per step, 14k steps (≈7.3B tokens). Data as in ``gpt2_124m.py``;
eight hosts of four chips, each running the command with ``--multihost``.
"""

from orthax.train import configs


def get_config(arg: str = 'muon'):
  return configs.pretraining_config(
      arg or 'muon', hardware='tpu-v4-64',
      model=dict(seq_len=1024, d_model=1024, num_layers=24, num_heads=16,
                 tie_embeddings=True),
      mesh=dict(data=2, fsdp=16, tensor=1), batch_size=512, steps=14000,
      warmup_steps=700, adamw_learning_rate=3e-4)
