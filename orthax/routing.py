"""Which optimizer branch each parameter goes to, and how it is a matrix.

Parameters are matched by ordered regex rules on their normalized path
(``'blocks/attn/qkv/kernel'``: dict keys, attribute names and sequence indices
joined by ``/``, a trailing NNX ``.value`` dropped). The first matching rule
gives the label — ``'matrix'`` (orthogonalized), ``'adam'`` (the AdamW
branch) or ``'frozen'`` (zero update) — and, for matrices, the
:class:`~orthax.MatrixSpec`. A leaf no rule covers is an error naming it.

The defaults are right for Flax NNX and linen models::

  embeddings (…embed…, wte, wpe)              -> adam
  LM head (lm_head, head, unembed…, logits)   -> adam
  norms (…norm…, ln…), bias, scale            -> adam   (any rank: stacked too)
  vectors and scalars (ndim <= 1)             -> adam
  …conv…/…Conv… kernels (ndim >= 3)          -> matrix, window+in = fan-in
  kernel / weight / w (ndim 2 or 3)           -> matrix, leading axis = layers
  any other 2-D leaf                          -> matrix

Some layouts are ambiguous, and a warning names the rule that settles
them: a 2-D leaf that looks like an output layer
(:class:`OutputLayerWarning`); and (:class:`MatrixViewWarning`) a 3-D
``query``/``key``/``value``/``out`` kernel shaped like Flax's
``MultiHeadAttention`` ``(features, heads, head_dim)``, which the 3-D rule
would read as a stack of layers, a 3-D kernel whose bias is one layer's or
stacks its layers on the middle axis, and a conv kernel that looks like a
scanned stack of convolutions, which the conv rule would read as one. The
rules themselves are :mod:`orthax._rules`, the checks
:mod:`orthax._view_suspects`.
"""

from __future__ import annotations

import copy
import numbers
from typing import Any, Iterable, Mapping, Sequence
import warnings

import jax

from orthax import _rules
from orthax import _table
from orthax import _view_checks as _views
from orthax import _view_suspects as _suspects
from orthax._view_checks import MatrixViewWarning
from orthax._view_checks import OutputLayerWarning
from orthax import _tree
from orthax._rules import DEFAULT_RULES
from orthax._rules import LABELS
from orthax._rules import Route
from orthax._rules import Rule
from orthax.matrices import MatrixSpec

__all__ = ['DEFAULT_RULES', 'LABELS', 'MatrixViewWarning',
           'OutputLayerWarning', 'Route', 'Rule', 'Router']

def _rule_list(rules: Any, what: str) -> tuple[Rule, ...]:
  """``rules`` as a tuple of :class:`Rule`; ``TypeError`` naming the
  argument for anything else (one Rule not in a list, a string)."""
  if isinstance(rules, (Rule, str)) or not isinstance(rules, Iterable):
    raise TypeError(f'Router: {what} must be a sequence of orthax.Rule, got '
                    f'{rules!r}' + (' (wrap it in a list)' if isinstance(
                        rules, Rule) else '') + '.')
  rules = tuple(rules)
  bad = [r for r in rules if not isinstance(r, Rule)]
  if bad:
    raise TypeError(f'Router: {what} must hold orthax.Rule objects, got '
                    f'{bad[0]!r}.')
  return rules


LAYOUTS = ('flax', 'torch')


def _check_max_side(max_side: Any) -> int:
  if (isinstance(max_side, bool) or not isinstance(max_side, numbers.Integral)
      or max_side < 1):
    raise ValueError(f'Router: max_side must be a positive int or None, '
                     f'got {max_side!r}.')
  return int(max_side)


class Router:
  """Ordered rules → a :class:`Route` per leaf.

  Args:
    rules: the full rule list (default :data:`DEFAULT_RULES`).
    extra_rules: rules tried *before* ``rules`` (the usual way to adjust the
      defaults, e.g. ``Rule('attn/out/kernel', 'matrix', MatrixSpec.heads(...))``).
    max_side: a leaf the rules make a matrix goes to ``'adam'`` instead when
      a side of its matrix view is ``≥ max_side`` (DCT-AdamW's limit for
      embeddings and heads; ``None``: no limit).
    layout: the view of a matrix leaf whose rule gives none: ``'flax'``
      (default): ``(..., in, out)``, Flax's and Haiku's kernels;
      ``'torch'``: ``(..., out, in)``, PyTorch's and Equinox's ``weight``
      (:meth:`orthax.MatrixSpec.torch_linear`). Leading axes are batch
      either way.
  """

  max_side: int | None = None  # also for subclasses that set only rules
  layout: str = 'flax'

  def __init__(self, rules: Sequence[Rule] | None = None, *,
               extra_rules: Iterable[Rule] = (), max_side: int | None = None,
               layout: str = 'flax'):
    self.rules = (_rule_list(extra_rules, 'extra_rules')
                  + _rule_list(DEFAULT_RULES if rules is None else rules,
                               'rules'))
    self.max_side = None if max_side is None else _check_max_side(max_side)
    if layout not in LAYOUTS:
      raise ValueError(f'Router: layout must be one of {LAYOUTS}, got '
                       f'{layout!r}.')
    self.layout = layout

  def route_one(self, path: str, shape: Sequence[int]) -> Route:
    """Route for one leaf; raises ``ValueError`` naming ``path`` if none."""
    ndim = len(shape)
    for rule in self.rules:
      if rule.matches(path, ndim):
        spec = rule.spec
        if rule.label == 'matrix':
          if spec is None:
            if ndim not in (2, 3):
              raise ValueError(
                  f'parameter {path!r} of shape {tuple(shape)} matched rule '
                  f'{rule.pattern!r} as a matrix, but a {ndim}-D leaf has no '
                  'default matrix view; add Rule(pattern, "matrix", '
                  'MatrixSpec(...)) via extra_rules, or route it to "adam".'
                  + _views.missing_view_hint(path, tuple(shape)))
            spec = (MatrixSpec.torch_linear() if self.layout == 'torch'
                    else MatrixSpec())
          try:
            spec.resolve(shape)
          except ValueError as e:
            raise ValueError(f'parameter {path!r}: {e}') from None
        return Route(rule.label, spec if rule.label == 'matrix' else None,
                     rule.pattern)
    raise ValueError(
        f'no routing rule covers parameter {path!r} of shape {tuple(shape)}; '
        'add a Rule for it (extra_rules=[orthax.Rule(pattern, label)]).')

  def with_max_side(self, max_side: int) -> 'Router':
    """A copy of this router whose matrices with a side ``≥ max_side`` go
    to ``'adam'`` (the smaller limit where it has one already)."""
    max_side = _check_max_side(max_side)
    limited = copy.copy(self)
    limited.max_side = (max_side if self.max_side is None
                        else min(self.max_side, max_side))
    return limited

  def route(self, path: str, shape: Sequence[int]) -> Route:
    """:meth:`route_one`'s route, sent to ``'adam'`` when it is a matrix
    with a side ``≥ max_side``: what every other method reads."""
    r = self.route_one(path, shape)
    if (self.max_side is not None and r.label == 'matrix'
        and max(r.spec.matrix_shape(shape)[1:]) >= self.max_side):
      return Route('adam', None, f'max_side={self.max_side}')
    return r

  def routes(self, tree: Any) -> Any:
    """A tree of :class:`Route` shaped like ``tree``."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return jax.tree.unflatten(treedef, [
        self.route(_tree.path_str(p), getattr(x, 'shape', ()))
        for p, x in flat])

  def labels(self, tree: Any) -> Any:
    """Labels for ``optax.partition``; warns for each leaf that looks like
    an output layer routed to the matrix branch
    (:meth:`warn_output_layers`) and for each attention kernel whose
    default view may be the wrong one (:meth:`view_suspects`)."""
    self.warn_output_layers(tree)
    for _, message in self.view_suspects(tree):
      warnings.warn(message, MatrixViewWarning, stacklevel=1)
    return self.quiet_labels(tree)

  def quiet_labels(self, tree: Any) -> Any:
    """:meth:`labels` without the warnings (for a second look at a tree
    already routed, e.g. SPECTRA's zeroing of ``'frozen'`` leaves)."""
    return jax.tree.map(lambda r: r.label, self.routes(tree),
                        is_leaf=lambda r: isinstance(r, Route))

  def specs(self, tree: Any) -> Any:
    """Matrix specs (``None`` for non-matrix leaves), shaped like ``tree``."""
    return jax.tree.map(lambda r: r.spec, self.routes(tree),
                        is_leaf=lambda r: isinstance(r, Route))

  def output_layer_suspects(self, tree: Any) -> list[tuple[str, str]]:
    """``(path, reason)`` of each 2-D leaf a *default* rule sends to the
    matrix branch that looks like an output layer: its fan-out equals the
    vocabulary (the rows of an ``…embed…`` table in ``tree``, not a
    position, token-type or segment table: ``wpe``, ``pos_embed``,
    ``position_embeddings``, ``embed_positions``, ``token_type_embeddings``,
    T5's ``relative_attention_bias``), or it is the
    last 2-D matrix of the tree (in natural path order, ``Dense_2`` before
    ``Dense_10``; a scanned stack, ``ScanBlock_0/…``, may sort after the
    head), the tree has other matrices, and its fan-out is no
    matrix's fan-in nor its last fan-in axis (a conv's input channels):
    nothing consumes its output, as a classifier's ``classes`` outputs (a
    low-rank adapter's factor, ``lora_a``/``lora_b``, is never taken for
    one: in a tree of adapters alone the last one's outputs feed nothing
    too). Output layers usually train better with AdamW."""
    return _suspects.output_layers(self, tree)

  def warn_output_layers(self, tree: Any) -> None:
    """Warns (:class:`OutputLayerWarning`) for each
    :meth:`output_layer_suspects` leaf, with the rule that routes it to
    AdamW and the one that keeps it a matrix (which also silences this)."""
    # One location for every call (here, not optax.partition's init or
    # update line): Python's default filter then shows each message once
    # (as for MatrixViewWarning in labels).
    for path, reason in self.output_layer_suspects(tree):
      warnings.warn(_views.output_layer_message(path, reason),
                    OutputLayerWarning, stacklevel=1)

  def attention_view_suspects(self, tree: Any) -> list[tuple[str, str]]:
    """``(path, message)`` of each 3-D ``query``/``key``/``value`` or
    ``out`` kernel that the *default* rule reads as a stack of layers
    (leading axis = layers) although its shape is that of Flax's
    ``MultiHeadAttention`` (NNX and linen) and of ``DenseGeneral``
    attention: ``(features, heads, head_dim)`` with ``heads·head_dim =
    features`` for the projections in, ``(heads, head_dim, features)`` for
    the one out; or, where ``heads·head_dim`` (Flax's ``qkv_features``) is
    not ``features``, a projection in and an ``out`` kernel side by side
    whose ``(heads, head_dim)`` agree. Read as a stack, each input row (each
    head) would be orthogonalized on its own. A stack ``(L, d, d)`` never
    has these shapes (``d·d ≠ L``; ``L·d = d`` only for one layer, where the
    two views are one matrix; its ``out`` stack ``(L, d, d)`` agrees with
    ``(d, d)`` only for ``L = d``, a cube, which is never warned about)."""
    return _suspects.attention_views(self, tree)

  def conv_view_suspects(self, tree: Any) -> list[tuple[str, str]]:
    """``(path, message)`` of each conv kernel (4-D or more) that a
    *default* rule reads as one convolution although it looks like a
    scanned stack of them (:mod:`orthax._view_checks`: a bias beside it
    shaped ``(L, out)``, a scanned module on its path, or a norm scale or
    bias shaped ``(L, c)`` in the module around it): read as one,
    every layer's kernel would share a single orthogonalization."""
    return _suspects.conv_views(self, tree)

  def stack_view_suspects(self, tree: Any) -> list[tuple[str, str]]:
    """``(path, message)`` of each 3-D kernel that the *default* rule reads
    as a stack of layers (leading axis) although the bias beside it says
    otherwise (:func:`orthax._view_checks.stack_axis_message`): a bias
    ``(out,)`` is one layer's (a 1-D convolution whose name lacks ``conv``
    would have each tap of its window orthogonalized on its own), and a
    bias ``(out, L)`` puts the ``L`` layers on the middle axis (linen's
    ``nn.scan(variable_axes={'params': 1})``: each input row would be a
    matrix). Without a bias, its neighbours can say so: the 3-D kernels
    of the module around it share their middle axis and not their leading
    one, and its 2-D norm scales end with it
    (:func:`orthax._view_checks.middle_stack_evidence`; MaxText's
    ``param_scan_axis=1``). Attention kernels are left to
    :meth:`attention_view_suspects`."""
    return _suspects.stack_views(self, tree)

  def layout_view_suspects(self, tree: Any) -> list[tuple[str, str]]:
    """``(path, message)`` of each 2-D leaf (or stack of them, ``(L, m,
    n)``) that the *default* rule reads in Flax's ``(in, out)`` layout
    although the bias beside it has the size of its first matrix axis
    (:func:`orthax._view_checks.torch_layout_message`): PyTorch's and
    Equinox's ``weight`` is ``(out, in)``, and read as ``(in, out)`` its
    shape scale and NorMuon's per-neuron statistics would be taken on the
    wrong sides (Newton–Schulz itself gives the same matrix either way).
    View such weights with ``orthax.MatrixSpec.torch_linear()``, or a whole
    model with ``Router(layout='torch')`` (which is never warned about)."""
    return _suspects.layout_views(self, tree)

  def view_suspects(self, tree: Any) -> list[tuple[str, str]]:
    """Every :class:`MatrixViewWarning`'s ``(path, message)``:
    :meth:`attention_view_suspects`, :meth:`conv_view_suspects`,
    :meth:`stack_view_suspects`, then :meth:`layout_view_suspects`."""
    return (self.attention_view_suspects(tree) + self.conv_view_suspects(tree)
            + self.stack_view_suspects(tree)
            + self.layout_view_suspects(tree))

  def describe(self, tree: Any,
               learning_rates: Mapping[str, Any] | None = None,
               weight_decays: Mapping[str, float] | None = None) -> str:
    """A table: path, shape, label, matrix view ``batch × fan_in ×
    fan_out`` (and, given ``learning_rates`` ``{label: rate or
    schedule}``, each leaf's learning rate; given ``weight_decays``
    ``{label: λ}``, its weight decay), then a note for each
    :meth:`output_layer_suspects` leaf."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    rows = [('path', 'shape', 'label', 'view')
            + (('lr',) if learning_rates is not None else ())
            + (('wd',) if weight_decays is not None else ())]
    for p, x in flat:
      path, shape = _tree.path_str(p), tuple(getattr(x, 'shape', ()))
      r = self.route(path, shape)
      view = ''
      if r.spec is not None:
        b, fi, fo = r.spec.matrix_shape(shape)
        view = f'{b} x {fi} x {fo}'
      row = (path, str(shape), r.label, view)
      if learning_rates is not None:
        row += (_table.format_hyperparameter(learning_rates.get(r.label)),)
      if weight_decays is not None:
        row += (_table.format_hyperparameter(weight_decays.get(r.label)),)
      rows.append(row)
    notes = [f'note: {_views.output_layer_message(path, reason)}'
             for path, reason in self.output_layer_suspects(tree)]
    notes += [f'note: {message}' for _, message in self.view_suspects(tree)]
    return '\n'.join([_table.format_table(rows)] + notes)
