"""The leaves whose default route may be the wrong one, found by a router
over a tree of parameters: output layers sent to the matrix branch and
kernels whose default matrix view may be wrong (the evidence and the
warning texts are :mod:`orthax._view_checks`'). :class:`orthax.Router`'s
``*_suspects`` methods are these functions; their docstrings say what each
looks for."""

from __future__ import annotations

import re
from typing import Any

import jax

from orthax import _rules
from orthax import _tree
from orthax import _view_checks as _views

Suspects = list[tuple[str, str]]

# A low-rank adapter's factor (lora_a, lora_B, ...): in a tree of adapters
# alone (fine-tuning with the base model frozen), the last one's outputs
# feed no other matrix of the tree, yet it is no output layer.
_ADAPTER = re.compile(r'(?i)(^|/)lora[^/]*$')


def leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """Each leaf's shape by normalized path."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_tree.path_str(p): tuple(getattr(x, 'shape', ())) for p, x in flat}


def rule_for(router: Any, path: str, ndim: int) -> _rules.Rule | None:
  """The first of ``router``'s rules matching the leaf, or ``None``."""
  return next((r for r in router.rules if r.matches(path, ndim)), None)


def reads_as_stack(router: Any, path: str, shape: tuple[int, ...]) -> bool:
  """Whether a *default* rule reads the 3-D leaf as a stack of layers (a
  matrix rule without a spec: ``MatrixSpec()``)."""
  rule = rule_for(router, path, len(shape))
  return (len(shape) == 3 and rule is not None and rule.spec is None
          and rule.label == 'matrix' and _rules.is_default(rule))


def _matrices(router: Any, shapes: dict[str, tuple[int, ...]]) -> list:
  """``(path, shape, inputs, fan_out, by_default_rule)`` of each leaf the
  router makes a matrix: ``inputs`` is what it consumes, its whole fan-in
  and its last fan-in axis (a conv's input channels, after its window)."""
  out = []
  for path, shape in shapes.items():
    rule = rule_for(router, path, len(shape))
    if rule is None or rule.label != 'matrix':
      continue
    r = router.route(path, shape)
    if r.label != 'matrix':  # over max_side
      continue
    _, fan_in, fan_out = r.spec.matrix_shape(shape)
    _, in_axes, _ = r.spec.resolve(shape)
    out.append((path, shape, {fan_in, shape[in_axes[-1]]}, fan_out,
                _rules.is_default(rule)))
  return out


def output_layers(router: Any, tree: Any) -> Suspects:
  """:meth:`orthax.Router.output_layer_suspects`."""
  shapes = leaf_shapes(tree)
  vocab = {shape[0] for path, shape in shapes.items() if len(shape) == 2
           and any(r.matches(path, 2) for r in _rules.EMBEDDING_RULES)
           and not _views.NOT_VOCABULARY.search(path)}
  matrices = _matrices(router, shapes)
  out = []
  for path, shape, _, fan_out, default in matrices:
    if default and len(shape) == 2 and fan_out in vocab:
      out.append((path, f'its fan-out {fan_out} is the vocabulary size'))
  flat = [m for m in matrices if len(m[1]) == 2
          and not _ADAPTER.search(m[0])]
  if len(matrices) >= 2 and flat:
    path, shape, _, fan_out, default = max(
        flat, key=lambda m: _views.natural_key(m[0]))
    fan_ins = set().union(*(m[2] for m in matrices))
    if (default and fan_out not in fan_ins and path not in dict(out)):
      out.append((path, f'it is the last matrix of the tree and its '
                        f'{fan_out} outputs feed no other matrix'))
  return out


def attention_views(router: Any, tree: Any) -> Suspects:
  """:meth:`orthax.Router.attention_view_suspects`."""
  shapes = leaf_shapes(tree)
  found = [(p, _views.attention_suspect(p, sh, shapes))
           for p, sh in shapes.items() if reads_as_stack(router, p, sh)]
  return [(p, message) for p, message in found if message]


def conv_views(router: Any, tree: Any) -> Suspects:
  """:meth:`orthax.Router.conv_view_suspects`."""
  shapes = leaf_shapes(tree)
  out = []
  for path, shape in shapes.items():
    rule = rule_for(router, path, len(shape))
    if (rule is None or rule.pattern != _rules.CONV
        or not _rules.is_default(rule)):
      continue  # not one of the default conv rules
    why = _views.conv_stack_evidence(path, shape, shapes)
    if why:
      out.append((path, _views.conv_message(path, shape, why)))
  return out


def stack_views(router: Any, tree: Any) -> Suspects:
  """:meth:`orthax.Router.stack_view_suspects`."""
  shapes = leaf_shapes(tree)
  attention = dict(attention_views(router, tree))
  out = []
  for path, shape in shapes.items():
    if path in attention or not reads_as_stack(router, path, shape):
      continue
    message = _views.stack_axis_message(path, shape, shapes)
    if message:
      out.append((path, message))
  return out


def layout_views(router: Any, tree: Any) -> Suspects:
  """:meth:`orthax.Router.layout_view_suspects`."""
  if getattr(router, 'layout', 'flax') != 'flax':
    return []
  shapes = leaf_shapes(tree)
  out = []
  for path, shape in shapes.items():
    rule = rule_for(router, path, len(shape))
    if (len(shape) not in (2, 3) or rule is None or rule.label != 'matrix'
        or rule.spec is not None or not _rules.is_default(rule)):
      continue
    message = _views.torch_layout_message(path, shape, shapes)
    if message:
      out.append((path, message))
  return out
