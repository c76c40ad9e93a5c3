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

Three layouts are ambiguous, and a warning names the rule that settles
them: a 2-D leaf that looks like an output layer
(:class:`OutputLayerWarning`), a 3-D ``query``/``key``/``value``/``out``
kernel shaped like Flax's ``MultiHeadAttention`` ``(features, heads,
head_dim)``, which the 3-D rule would read as a stack of layers, and a conv
kernel that looks like a scanned stack of convolutions, which the conv rule
would read as one (both :class:`MatrixViewWarning`).
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
import re
from typing import Any, Iterable, Mapping, Sequence
import warnings

import jax

from orthax import _table
from orthax import _view_checks as _views
from orthax._view_checks import MatrixViewWarning
from orthax._view_checks import OutputLayerWarning
from orthax import _tree
from orthax.matrices import MatrixSpec

LABELS = ('matrix', 'adam', 'frozen')


@dataclasses.dataclass(frozen=True)
class Rule:
  """``label`` (and ``spec``) for leaves whose path matches ``pattern``.

  Attributes:
    pattern: regex searched (``re.search``) in the normalized path.
    label: ``'matrix'``, ``'adam'`` or ``'frozen'``.
    spec: the matrix view for ``'matrix'`` leaves; ``None`` means the default
      ``MatrixSpec()`` (last two axes are ``(in, out)``, leading axes batch),
      allowed for ranks 2 and 3 only.
    ndims: restrict the rule to leaves of these ranks (``None``: any rank).
  """

  pattern: str
  label: str
  spec: MatrixSpec | None = None
  ndims: tuple[int, ...] | None = None

  def __post_init__(self):
    if self.label not in LABELS:
      raise ValueError(f'Rule label must be one of {LABELS}, got '
                       f'{self.label!r} (pattern {self.pattern!r}).')
    try:
      re.compile(self.pattern)
    except (re.error, TypeError) as e:
      raise ValueError(f'Rule pattern {self.pattern!r} is not a regular '
                       f'expression: {e}.') from None
    if self.spec is not None and not isinstance(self.spec, MatrixSpec):
      raise TypeError(f'Rule {self.pattern!r}: spec must be an '
                      f'orthax.MatrixSpec or None, got {self.spec!r}.')
    if self.spec is not None and self.label != 'matrix':
      raise ValueError(f'Rule {self.pattern!r}: a spec is for label '
                       f"'matrix', not {self.label!r}.")
    if self.ndims is not None:
      ndims = (self.ndims,) if isinstance(self.ndims, numbers.Integral) \
          else self.ndims
      try:
        ndims = tuple(ndims)
      except TypeError:
        ndims = None
      if ndims is None or not all(isinstance(n, numbers.Integral)
                                  and not isinstance(n, bool) and n >= 0
                                  for n in ndims):
        raise TypeError(f'Rule {self.pattern!r}: ndims must be a rank or a '
                        f'sequence of ranks (ints >= 0), got '
                        f'{self.ndims!r}.')
      object.__setattr__(self, 'ndims', tuple(int(n) for n in ndims))

  def matches(self, path: str, ndim: int) -> bool:
    return ((self.ndims is None or ndim in self.ndims)
            and re.search(self.pattern, path) is not None)


@dataclasses.dataclass(frozen=True)
class Route:
  """Where one leaf goes."""
  label: str
  spec: MatrixSpec | None
  rule: str  # the pattern that matched, or 'max_side=N' (Router.max_side)


_VECTOR_RANKS = (0, 1)
# Any case: linen names its convolutions Conv_0, ConvTranspose_0, ...
_CONV = r'(?i)conv[^/]*/kernel$'
DEFAULT_RULES: tuple[Rule, ...] = (
    Rule(r'(^|/)([^/]*embed[^/]*|wte|wpe)(/|$)', 'adam'),
    Rule(r'(^|/)(lm_head|head|unembed[^/]*|logits)(/|$)', 'adam'),
    Rule(r'(^|/)([^/]*norm[^/]*|ln[^/]*)(/|$)', 'adam'),
    Rule(r'(^|/)(bias|scale|[^/]*_bias|[^/]*_scale)$', 'adam'),
    Rule(r'', 'adam', ndims=_VECTOR_RANKS),
    *(Rule(_CONV, 'matrix', MatrixSpec.conv(n), ndims=(n,))
      for n in (3, 4, 5)),
    Rule(r'(^|/)(kernel|weight|w)$', 'matrix'),
    Rule(r'', 'matrix', ndims=(2,)),
)


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


def _is_default(rule: Rule) -> bool:
  """One of :data:`DEFAULT_RULES` (the ones the warnings second-guess)."""
  return any(rule is d for d in DEFAULT_RULES)


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """Each leaf's shape by normalized path."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_tree.path_str(p): tuple(getattr(x, 'shape', ())) for p, x in flat}


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
  """

  max_side: int | None = None  # also for subclasses that set only rules

  def __init__(self, rules: Sequence[Rule] | None = None, *,
               extra_rules: Iterable[Rule] = (), max_side: int | None = None):
    self.rules = (_rule_list(extra_rules, 'extra_rules')
                  + _rule_list(DEFAULT_RULES if rules is None else rules,
                               'rules'))
    self.max_side = None if max_side is None else _check_max_side(max_side)

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
            spec = MatrixSpec()
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
    nothing consumes its output, as a classifier's ``classes`` outputs.
    Output layers usually train better with AdamW."""
    shapes = _leaf_shapes(tree)
    vocab = {shape[0] for path, shape in shapes.items() if len(shape) == 2
             and DEFAULT_RULES[0].matches(path, 2)
             and not _views.NOT_VOCABULARY.search(path)}
    matrices = []  # (path, shape, inputs, fan_out, by_default_rule)
    for path, shape in shapes.items():
      rule = self._rule_for(path, len(shape))
      if rule is not None and rule.label == 'matrix':
        r = self.route(path, shape)
        if r.label != 'matrix':  # over max_side
          continue
        _, fan_in, fan_out = r.spec.matrix_shape(shape)
        # What it consumes: its whole fan-in, or its last fan-in axis (a
        # conv's input channels, after its window).
        _, in_axes, _ = r.spec.resolve(shape)
        inputs = {fan_in, shape[in_axes[-1]]}
        matrices.append((path, shape, inputs, fan_out, _is_default(rule)))
    out = []
    for path, shape, _, fan_out, default in matrices:
      if default and len(shape) == 2 and fan_out in vocab:
        out.append((path, f'its fan-out {fan_out} is the vocabulary size'))
    flat = [m for m in matrices if len(m[1]) == 2]
    if len(matrices) >= 2 and flat:
      path, shape, _, fan_out, default = max(
          flat, key=lambda m: _views.natural_key(m[0]))
      fan_ins = set().union(*(m[2] for m in matrices))
      if (default and len(shape) == 2 and fan_out not in fan_ins
          and path not in dict(out)):
        out.append((path, f'it is the last matrix of the tree and its '
                          f'{fan_out} outputs feed no other matrix'))
    return out

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
    shapes = _leaf_shapes(tree)
    found = [(p, _views.attention_suspect(p, sh, shapes))
             for p, sh in shapes.items() if self._reads_as_stack(p, sh)]
    return [(p, message) for p, message in found if message]

  def conv_view_suspects(self, tree: Any) -> list[tuple[str, str]]:
    """``(path, message)`` of each conv kernel (4-D or more) that a
    *default* rule reads as one convolution although it looks like a
    scanned stack of them (:mod:`orthax._view_checks`: a bias beside it
    shaped ``(L, out)``, or a scanned module on its path): read as one,
    every layer's kernel would share a single orthogonalization."""
    shapes = _leaf_shapes(tree)
    out = []
    for path, shape in shapes.items():
      rule = self._rule_for(path, len(shape))
      if rule is None or rule.pattern != _CONV or not _is_default(rule):
        continue  # not one of the default conv rules
      why = _views.conv_stack_evidence(path, shape, shapes)
      if why:
        out.append((path, _views.conv_message(path, shape, why)))
    return out

  def stack_view_suspects(self, tree: Any) -> list[tuple[str, str]]:
    """``(path, message)`` of each 3-D kernel that the *default* rule reads
    as a stack of layers although a bias beside it is one layer's,
    ``(out,)`` (:func:`orthax._view_checks.one_layer_evidence`): a 1-D
    convolution whose name lacks ``conv`` would have each tap of its
    window orthogonalized on its own. Attention kernels are left to
    :meth:`attention_view_suspects`."""
    shapes = _leaf_shapes(tree)
    attention = dict(self.attention_view_suspects(tree))
    found = [(p, sh, _views.one_layer_evidence(p, sh, shapes))
             for p, sh in shapes.items()
             if p not in attention and self._reads_as_stack(p, sh)]
    return [(p, _views.one_layer_message(p, sh, why))
            for p, sh, why in found if why]

  def view_suspects(self, tree: Any) -> list[tuple[str, str]]:
    """Every :class:`MatrixViewWarning`'s ``(path, message)``:
    :meth:`attention_view_suspects`, :meth:`conv_view_suspects`, then
    :meth:`stack_view_suspects`."""
    return (self.attention_view_suspects(tree) + self.conv_view_suspects(tree)
            + self.stack_view_suspects(tree))

  def _rule_for(self, path: str, ndim: int) -> Rule | None:
    return next((r for r in self.rules if r.matches(path, ndim)), None)

  def _reads_as_stack(self, path: str, shape: tuple[int, ...]) -> bool:
    """Whether a *default* rule reads the 3-D leaf as a stack of layers
    (a matrix rule without a spec: ``MatrixSpec()``)."""
    rule = self._rule_for(path, len(shape))
    return (len(shape) == 3 and rule is not None and rule.spec is None
            and rule.label == 'matrix' and _is_default(rule))

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
