"""Model FLOPs per token and accelerator peaks, for the trainer's MFU.

MFU (model FLOPs utilization, Chowdhery et al., *PaLM*, arXiv 2204.02311,
appendix B) is the FLOPs the model needs per step divided by what the
devices could do in the step's wall time:

.. math::
   \\mathrm{MFU} = \\frac{F_{tok}\\cdot \\mathrm{tokens/s}}{n_{dev}\\cdot P},
   \\qquad F_{tok} = 6 N + 12\\, L\\, d\\, T

with ``N`` the parameters that take part in matrix products (all but the
input embedding tables; a tied head counts once), ``L`` layers, ``d`` the
width and ``T`` the context (attention scores and values, forward and
backward), and ``P`` one device's dense bf16 peak. The optimizer's own
FLOPs (Newton–Schulz) are not model FLOPs and are left out, as in the
PaLM definition.
"""

from __future__ import annotations

from typing import Any

# Dense bf16 peak FLOP/s per device, by the start of ``device.device_kind``
# (vendors' data sheets; no sparsity).
PEAK_BF16_FLOPS = {
    'NVIDIA H100': 989e12,
    'NVIDIA H200': 989e12,
    'NVIDIA GH200': 989e12,
    'NVIDIA B200': 2250e12,
    'NVIDIA A100': 312e12,
    'NVIDIA L4': 121e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v5': 459e12,
    'TPU v6 lite': 918e12,
    'TPU v6e': 918e12,
}


def peak_flops(device_kind: str) -> float | None:
  """The dense bf16 peak of a device kind (longest matching prefix), or
  ``None`` when unknown (CPUs: set ``train.peak_flops`` to get an MFU)."""
  matches = [k for k in PEAK_BF16_FLOPS if device_kind.startswith(k)]
  return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


def flops_per_token(model_cfg: Any, num_params: int) -> float:
  """``6N + 12·L·d·T`` for a :class:`orthax.train.model.GPTConfig` whose
  parameters number ``num_params``: the input embedding tables (tokens;
  learned positions) are lookups, not products, except a tied table,
  which is also the head."""
  d, lookup = model_cfg.d_model, 0
  if not model_cfg.tie_embeddings:
    lookup += model_cfg.vocab_size * d
  if model_cfg.positions == 'learned':
    lookup += model_cfg.seq_len * d
  n = num_params - lookup
  return 6.0 * n + 12.0 * model_cfg.num_layers * d * model_cfg.seq_len
