"""LANTON's Signum group: the embeddings and LM head routed to a Signum step
(Hao et al., arXiv 2510.14009: "we update these weight-sharing layers with
Signum"), the router that labels them and the checks on its settings."""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

from orthax import _tree
from orthax import routing
from orthax import transforms as T


SIGNUM_PATTERN = (r'(^|/)([^/]*embed[^/]*|wte|wpe|lm_head|head|unembed[^/]*'
                  r'|logits)(/|$)')


def _is_signum(label: str, path: str, ndim: int, pattern: re.Pattern) -> bool:
  """An ``'adam'`` leaf of 2 or more dimensions whose path matches."""
  return label == 'adam' and ndim >= 2 and pattern.search(path) is not None


class SignumRouter(routing.Router):
  """``base``'s routes, with ``'signum'`` for the 2-D-or-larger ``'adam'``
  leaves whose path matches ``pattern`` (LANTON's embeddings and LM head):
  a :class:`orthax.Router`, so :func:`orthax.describe` reads it."""

  def __init__(self, base: routing.Router, pattern: str = SIGNUM_PATTERN):
    # pylint: disable=super-init-not-called (rules and limit are base's)
    self.base, self.pattern = base, re.compile(pattern)

  rules = property(lambda self: self.base.rules)
  max_side = property(lambda self: self.base.max_side)

  def with_max_side(self, max_side: int) -> 'SignumRouter':
    return SignumRouter(self.base.with_max_side(max_side),
                        self.pattern.pattern)

  def route(self, path, shape):
    r = self.base.route(path, shape)
    if _is_signum(r.label, path, len(shape), self.pattern):
      return routing.Route('signum', None, self.pattern.pattern)
    return r


def signum_labels(router, pattern: str = SIGNUM_PATTERN):
  """LANTON's router: :class:`SignumRouter` around an :class:`orthax.Router`;
  around a labels callable, a labels callable doing the same."""
  if isinstance(router, routing.Router):
    return SignumRouter(router, pattern)
  rx = re.compile(pattern)

  def labels(params):
    paths, leaves, treedef = _tree.leaves_with_paths(params)
    labs = treedef.flatten_up_to(router(params))
    return jax.tree.unflatten(treedef, [
        'signum' if _is_signum(lab, p, getattr(x, 'ndim', 0), rx) else lab
        for p, x, lab in zip(paths, leaves, labs)])

  return labels


def check_settings(reference, pattern, learning_rate, beta):
  """Refuses LANTON's Signum settings where no leaf can take them.

  Raises:
    ValueError: ``pattern`` is ``''`` (it matches every path), or it is
      ``None`` (mode ``reference`` has no Signum group) while the Signum
      ``learning_rate`` or ``beta`` is given; naming the argument.
  """
  if pattern == '':
    raise ValueError("lanton: signum_pattern '' matches every path; pass "
                     "'^$' for no Signum group.")
  if pattern is not None:
    try:
      re.compile(pattern)
    except (TypeError, re.error) as e:
      raise ValueError(f'lanton: signum_pattern must be a regular expression '
                       f'(a string), got {pattern!r} ({e}).') from None
  given = [name for name, v in (('signum_learning_rate', learning_rate),
                                ('signum_beta', beta)) if v is not None]
  if pattern is None and given:
    raise ValueError(
        f'lanton: {given[0]} is given, but reference={reference!r} has no '
        'Signum group (embeddings and head are on the AdamW branch): pass '
        "signum_pattern (e.g. orthax.recipes.signum_group.SIGNUM_PATTERN) or "
        "reference='paper'.")


def signum_step(beta: float, learning_rate: optax.ScalarOrSchedule,
                mu_dtype: Any) -> optax.GradientTransformation:
  """LANTON's embedding and head step, ``-η_s·sign(B)``, ``B`` an EMA of the
  gradient at rate ``beta``."""
  return T.named_chain(
      ('signum_momentum', T.momentum(beta, form='ema', nesterov=False,
                                     accumulator_dtype=mu_dtype)),
      ('sign', optax.scale_by_sign()),
      ('scale_by_signum_learning_rate',
       optax.scale_by_learning_rate(learning_rate)))
