"""The routing rules: :class:`Rule` (a pattern, a label and a matrix view),
:class:`Route` (where one leaf goes) and :data:`DEFAULT_RULES`, the rules
for Flax NNX and linen models (:mod:`orthax.routing` applies them)."""

from __future__ import annotations

import dataclasses
import numbers
import re

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
      raise ValueError(f'Rule: label must be one of {LABELS}, got '
                       f'{self.label!r} (pattern {self.pattern!r}).')
    try:
      re.compile(self.pattern)
    except (re.error, TypeError) as e:
      raise ValueError(f'Rule: pattern {self.pattern!r} is not a regular '
                       f'expression: {e}.') from None
    if self.spec is not None and not isinstance(self.spec, MatrixSpec):
      raise TypeError(f'Rule: spec must be an orthax.MatrixSpec or None, '
                      f'got {self.spec!r} (pattern {self.pattern!r}).')
    if self.spec is not None and self.label != 'matrix':
      raise ValueError(f"Rule: spec is for label 'matrix', not "
                       f'{self.label!r} (pattern {self.pattern!r}).')
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
        raise TypeError(f'Rule: ndims must be a rank or a sequence of '
                        f'ranks (ints >= 0), got {self.ndims!r} (pattern '
                        f'{self.pattern!r}).')
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


VECTOR_RANKS = (0, 1)
# Any case: linen names its convolutions Conv_0, ConvTranspose_0, ...
CONV = r'(?i)conv[^/]*/kernel$'
# Embedding tables (``embedding``, ``pos_embed``, GPT-2's ``wte``/``wpe``;
# leaves named ``pos_emb``, ``tok_emb``) and learned tokens (leaves: a
# ViT's ``cls_token``, ``register_tokens``; not MLP-Mixer's ``mlp_tokens``
# module); biases under Haiku's name ``b`` too, inside a module (a stack of
# them is 2-D; a top-level ``b`` of a toy tree ``{'a', 'b'}`` may be a
# matrix).
EMBEDDING_RULES: tuple[Rule, ...] = (
    Rule(r'(^|/)([^/]*embed[^/]*|wte|wpe)(/|$)', 'adam'),
    Rule(r'(^|/)([^/]*_emb|emb|[^/]*_tokens?)$', 'adam'),  # leaves only
)
DEFAULT_RULES: tuple[Rule, ...] = (
    *EMBEDDING_RULES,
    Rule(r'(^|/)(lm_head|head|unembed[^/]*|logits)(/|$)', 'adam'),
    Rule(r'(^|/)([^/]*norm[^/]*|ln[^/]*)(/|$)', 'adam'),
    Rule(r'(^|/)(bias|scale|[^/]*_bias|[^/]*_scale)$|./b$', 'adam'),
    Rule(r'', 'adam', ndims=VECTOR_RANKS),
    *(Rule(CONV, 'matrix', MatrixSpec.conv(n), ndims=(n,))
      for n in (3, 4, 5)),
    Rule(r'(^|/)(kernel|weight|w)$', 'matrix'),
    Rule(r'', 'matrix', ndims=(2,)),
)


def is_default(rule: Rule) -> bool:
  """One of :data:`DEFAULT_RULES` (the ones the warnings second-guess)."""
  return any(rule is d for d in DEFAULT_RULES)
