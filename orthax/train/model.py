"""A small GPT in Flax NNX, with its layers stacked for ``nnx.scan``.

Pre-norm decoder: token embedding (plus learned positions, or RoPE inside
attention), ``num_layers`` blocks ``x += attn(rms(x)); x += mlp(rms(x))``,
a final RMS norm and an untied or tied LM head. The blocks are created with
``nnx.vmap``, so every block parameter is one leaf with a leading layer axis
(``blocks/attn/query/kernel`` is ``(L, d, d)``), the shape orthax routes as
a stack of ``L`` matrices and shards as such.

Parameters are handled as a plain nested dict of arrays
(:func:`init_params`); :func:`apply` merges them into the module for a
forward pass. :func:`logical_axes` names every parameter's axes
(``'layers'``, ``'embed'``, ``'heads'``, ``'mlp'``, ``'vocab'``), which
:mod:`orthax.train.partitioning` maps onto a mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

POSITIONS = ('rope', 'learned')


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Model hyperparameters (``d_model`` must divide by ``num_heads``)."""
  vocab_size: int = 256
  seq_len: int = 128
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  mlp_ratio: int = 4
  positions: str = 'rope'
  tie_embeddings: bool = False  # head = the embedding table (std 1/d)
  rope_base: float = 10000.0
  dtype: str = 'float32'         # activations / matmul inputs
  param_dtype: str = 'float32'
  remat: bool = False            # rematerialize each block in the backward

  def __post_init__(self):
    for f in ('vocab_size', 'seq_len', 'd_model', 'num_layers', 'num_heads',
              'mlp_ratio'):
      if int(getattr(self, f)) < 1:
        raise ValueError(f'model.{f} must be positive, got '
                         f'{getattr(self, f)}.')
    if self.d_model % self.num_heads:
      raise ValueError(f'model.d_model={self.d_model} is not divisible by '
                       f'model.num_heads={self.num_heads}.')
    if self.positions not in POSITIONS:
      raise ValueError(f'model.positions must be one of {POSITIONS}, got '
                       f'{self.positions!r}.')
    if self.positions == 'rope' and (self.d_model // self.num_heads) % 2:
      raise ValueError('model.positions="rope" needs an even head dimension, '
                       f'got {self.d_model // self.num_heads}.')

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def d_ff(self) -> int:
    return self.mlp_ratio * self.d_model


_MESH = contextvars.ContextVar('orthax_train_mesh', default=None)


@contextlib.contextmanager
def activation_mesh(mesh):
  """While tracing inside this context, :func:`constrain_batch` pins
  activations to ``mesh`` (the trainer wraps its loss in it)."""
  token = _MESH.set(mesh)
  try:
    yield
  finally:
    _MESH.reset(token)


def constrain_batch(x: jax.Array) -> jax.Array:
  """Pins an activation's leading (batch) axis to the ``data`` and ``fsdp``
  axes of the :func:`activation_mesh` in effect; a no-op outside one, so
  the model also runs on its own."""
  mesh = _MESH.get()
  axes = () if mesh is None else tuple(
      a for a in ('data', 'fsdp') if a in mesh.axis_names)
  if not axes:
    return x
  spec = P(axes, *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _init(fan_in: int, scale: float = 1.0):
  return nnx.initializers.normal(scale / math.sqrt(fan_in))


def _rope(x: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding on ``x`` of shape ``[B, T, H, Dh]``."""
  t, dh = x.shape[1], x.shape[-1]
  freqs = base ** (-jnp.arange(0, dh, 2, dtype=jnp.float32) / dh)
  angles = jnp.arange(t, dtype=jnp.float32)[:, None] * freqs[None, :]
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)
  return out.astype(x.dtype)


class Attention(nnx.Module):
  """Causal multi-head self-attention with separate q/k/v/out matrices."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    d, dt, pdt = cfg.d_model, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    out_scale = 1.0 / math.sqrt(2 * cfg.num_layers)
    lin = lambda s: dict(use_bias=False, dtype=dt, param_dtype=pdt,
                         kernel_init=_init(d, s), rngs=rngs)
    self.query = nnx.Linear(d, d, **lin(1.0))
    self.key = nnx.Linear(d, d, **lin(1.0))
    self.value = nnx.Linear(d, d, **lin(1.0))
    self.out = nnx.Linear(d, d, **lin(out_scale))
    self.cfg = cfg

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    h, dh = self.cfg.num_heads, self.cfg.head_dim
    q, k, v = (f(x).reshape(b, t, h, dh)
               for f in (self.query, self.key, self.value))
    if self.cfg.positions == 'rope':
      q, k = _rope(q, self.cfg.rope_base), _rope(k, self.cfg.rope_base)
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return self.out(y.reshape(b, t, h * dh))


class MLP(nnx.Module):
  """``fc2(gelu(fc1(x)))``."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.d_ff
    kw = dict(use_bias=False, dtype=jnp.dtype(cfg.dtype),
              param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
    self.fc1 = nnx.Linear(d, f, kernel_init=_init(d), **kw)
    self.fc2 = nnx.Linear(
        f, d, kernel_init=_init(f, 1.0 / math.sqrt(2 * cfg.num_layers)), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x)))


class Block(nnx.Module):
  """Pre-norm residual block: attention then MLP."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    kw = dict(dtype=jnp.dtype(cfg.dtype),
              param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
    self.attn_norm = nnx.RMSNorm(cfg.d_model, **kw)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = nnx.RMSNorm(cfg.d_model, **kw)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x))
    return x + self.mlp(self.mlp_norm(x))


class GPT(nnx.Module):
  """The decoder; ``model(tokens [B, T]) -> logits [B, T, vocab]`` (f32)."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    pdt = jnp.dtype(cfg.param_dtype)
    # Tied, the table is also the head: a token's logit for itself is
    # e·RMSNorm(e) ≈ std·d_model at init (the residual stream is mostly its
    # embedding), so std 1/d_model (1 untied) starts near a uniform guess;
    # at std 1 it started at 27–624 nats (d_model 32–768). Learned
    # positions keep their scale relative to it (0.02 of it).
    std = 1.0 / cfg.d_model if cfg.tie_embeddings else 1.0
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, param_dtype=pdt,
                           embedding_init=nnx.initializers.normal(std),
                           rngs=rngs)
    if cfg.positions == 'learned':
      self.pos_embed = nnx.Embed(
          cfg.seq_len, cfg.d_model, param_dtype=pdt,
          embedding_init=nnx.initializers.normal(0.02 * std), rngs=rngs)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return Block(cfg, rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = nnx.RMSNorm(cfg.d_model, param_dtype=pdt, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False,
                                param_dtype=pdt, kernel_init=_init(cfg.d_model),
                                rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    cfg = self.cfg
    if tokens.shape[-1] > cfg.seq_len:
      raise ValueError(f'sequence length {tokens.shape[-1]} exceeds '
                       f'model.seq_len={cfg.seq_len}.')
    x = self.embed(tokens).astype(cfg.dtype)
    if cfg.positions == 'learned':
      x = x + self.pos_embed(jnp.arange(tokens.shape[-1])).astype(cfg.dtype)

    def body(x, block):
      return block(constrain_batch(x))

    if cfg.remat:
      body = nnx.remat(body)
    x = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(
        x, self.blocks)
    x = self.final_norm(constrain_batch(x)).astype(jnp.float32)
    if cfg.tie_embeddings:
      return self.embed.attend(x)
    return self.lm_head(x).astype(jnp.float32)


# Logical axis names of every parameter, by path without the layer axis.
# 'layers' is prepended for block parameters (they carry a leading L axis).
_LOGICAL = {
    ('embed', 'embedding'): ('vocab', 'embed'),
    ('pos_embed', 'embedding'): (None, 'embed'),
    ('final_norm', 'scale'): ('embed',),
    ('lm_head', 'kernel'): ('embed', 'vocab'),
    ('attn_norm', 'scale'): ('embed',),
    ('mlp_norm', 'scale'): ('embed',),
    ('attn', 'query', 'kernel'): ('embed', 'heads'),
    ('attn', 'key', 'kernel'): ('embed', 'heads'),
    ('attn', 'value', 'kernel'): ('embed', 'heads'),
    ('attn', 'out', 'kernel'): ('heads', 'embed'),
    ('mlp', 'fc1', 'kernel'): ('embed', 'mlp'),
    ('mlp', 'fc2', 'kernel'): ('mlp', 'embed'),
}


def _keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def logical_axes(params: Any) -> Any:
  """A tree of logical-axis tuples shaped like ``params`` (one name or
  ``None`` per array axis); raises ``ValueError`` for an unnamed parameter."""

  def one(path, x):
    keys = _keys(path)
    stacked = keys[0] == 'blocks'
    names = _LOGICAL.get(keys[1:] if stacked else keys)
    if names is None:
      raise ValueError(f'parameter {"/".join(keys)!r} has no logical axes; '
                       'add it to orthax.train.model._LOGICAL.')
    names = (('layers',) if stacked else ()) + names
    if len(names) != len(x.shape):
      raise ValueError(f'parameter {"/".join(keys)!r} of shape {x.shape} has '
                       f'{len(names)} logical axes {names}.')
    return names

  return jax.tree_util.tree_map_with_path(one, params)


def _pure(state) -> Any:
  to_pure = getattr(nnx, 'to_pure_dict', None)  # flax >= 0.12.1
  return to_pure(state) if to_pure is not None else state.to_pure_dict()


def create(cfg: GPTConfig, seed: int = 0) -> tuple[Any, Any, Any]:
  """``(graphdef, abstract_state, params)``: the module's structure, an
  abstract template of its state, and its parameters as a nested dict."""
  graphdef, state = nnx.split(GPT(cfg, nnx.Rngs(seed)))
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          state)
  return graphdef, abstract, _pure(state)


def abstract(cfg: GPTConfig) -> tuple[Any, Any, Any]:
  """Like :func:`create` without allocating: params are
  ``ShapeDtypeStruct``\\ s (for dry runs of models that do not fit)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0))))
  pure = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                      _pure(state))
  return graphdef, state, pure


def apply(graphdef: Any, abstract_state: Any, params: Any,
          tokens: jax.Array) -> jax.Array:
  """Logits of the model whose parameters are the nested dict ``params``."""
  state = jax.tree.map(lambda v: v, abstract_state)  # fresh Variables
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)(tokens)


def num_params(params: Any) -> int:
  """Total number of parameter elements."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
