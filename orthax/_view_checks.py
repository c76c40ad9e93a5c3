"""Evidence and warning texts for what the default routing rules may get
wrong: matrix views (:class:`orthax.MatrixViewWarning`: Flax attention
kernels read as stacks of layers, :meth:`orthax.Router.attention_view_suspects`;
scanned stacks of convolutions read as one,
:meth:`orthax.Router.conv_view_suspects`; one layer's 3-D kernel read as a
stack, or a stack on the middle axis read as one on the leading axis,
:meth:`orthax.Router.stack_view_suspects`) and output layers sent to
the matrix branch (:class:`orthax.OutputLayerWarning`).

A scanned stack of ``L`` convolutions (``nn.scan``, ``nnx.vmap``) has the
kernel shape ``(L, *window, in, out)``, that of one convolution with a
window of one more dimension, so the shape alone cannot tell them apart.
Three things can: a bias beside the kernel shaped ``(L, out)`` (one
convolution's bias is ``(out,)``), a module on the path named like
linen's ``nn.scan`` (``ScanBlock_0``), or a norm's scale or a bias shaped
``(L, c)`` in the module around the conv (ResNet's conv + BatchNorm has no
conv bias; one layer's norm is 1-D).
"""

from __future__ import annotations

import re

from orthax import _tree

_SCAN = re.compile(r'(?i)(^|/)scan[^/]*/')


def _bias_beside(path: str) -> str:
  """The path of the bias in the same module as the leaf at ``path``."""
  return path[:len(path) - len(path.rsplit('/', 1)[-1])] + 'bias'
_ATTENTION = re.compile(r'(?i)(attention|attn|query|key|value)[^/]*/')


def conv_stack_evidence(path: str, shape: tuple[int, ...],
                   shapes: dict[str, tuple[int, ...]]) -> str | None:
  """Why the conv kernel at ``path`` looks like a stack of layers, or
  ``None``. ``shapes``: every leaf's shape by path."""
  if len(shape) < 4 or not path.endswith('/kernel'):
    return None
  bias = _bias_beside(path)
  if shapes.get(bias) == (shape[0], shape[-1]):
    return f'its bias {bias!r} has shape {(shape[0], shape[-1])}'
  if _SCAN.search(path):
    return 'it is inside a scanned module'
  # A conv followed by a norm has no bias (ResNet's conv + BatchNorm); a
  # norm's scale or a bias of one layer is 1-D, so a 2-D one of L rows and
  # the conv's channels in the module around it says that module is
  # stacked (not an attention bias, (heads, head_dim); not a window of 1).
  if (shape[0] == 1 or bias in shapes or path.count('/') < 2):
    return None
  module = path.rsplit('/', 2)[0] + '/'
  for other, sh in shapes.items():
    if (other.startswith(module) and other.rsplit('/', 1)[-1] in (
        'scale', 'bias') and not _ATTENTION.search(other)
        and sh in ((shape[0], shape[-1]), (shape[0], shape[-2]))):
      return (f'{other!r} in the same module has shape {sh} (a norm or '
              'bias stacked like layers)')
  return None


def _two_rules(pattern: str, fix: str, fix_spec: str, keep_case: str,
               keep_spec: str) -> str:
  """The end of every view warning: the rule for one reading of the leaf,
  then the rule that keeps the other and silences the warning."""
  return (f'{fix}: router=orthax.Router(extra_rules=[orthax.Rule('
          f'{pattern!r}, "matrix", {fix_spec})]); if {keep_case}, keep it '
          f'without this warning: orthax.Rule({pattern!r}, "matrix", '
          f'{keep_spec}).')


def conv_message(path: str, shape: tuple[int, ...], evidence: str) -> str:
  nd = len(shape)
  pattern = _tree.exact_pattern(path)
  layers = ', '.join(str(a) for a in range(1, nd - 1))
  return (f'parameter {path!r} of shape {shape} is read as one convolution '
          f'(a {nd - 2}-D window: the default rule for conv kernels), but '
          f'{evidence}: its leading axis may stack {shape[0]} layers '
          '(nn.scan, nnx.vmap). If it does, '
          + _two_rules(pattern, 'orthogonalize each layer',
                       f'orthax.MatrixSpec(fan_in=({layers}), '
                       f'fan_out={nd - 1})', 'it is one convolution',
                       f'orthax.MatrixSpec.conv({nd})'))


def stack_axis_message(path: str, shape: tuple[int, ...],
                       shapes: dict[str, tuple[int, ...]]) -> str | None:
  """The warning for a 3-D kernel ``(a, b, c)`` that the default rule reads
  as ``a`` stacked layers although the bias beside it says otherwise, or
  ``None``: a bias ``(c,)`` is one layer's (a 1-D convolution whose name
  lacks ``conv``: each tap of its window would be orthogonalized on its
  own); a bias ``(c, b)`` says the ``b`` layers are the middle axis
  (linen's ``nn.scan(variable_axes={'params': 1})``: every row of the
  input would be a matrix of its own). ``shapes``: every leaf's shape by
  path."""
  if len(shape) != 3 or not path.endswith('/kernel'):
    return None
  bias_path = _bias_beside(path)
  bias = shapes.get(bias_path)
  a, b, c = shape
  if a >= 2 and bias == (c,):
    return one_layer_message(
        path, shape, f'its bias {bias_path!r} has shape {bias}, one layer\'s')
  if b >= 2 and bias == (c, b) and bias != (a, c):
    return middle_stack_message(
        path, shape, f'its bias {bias_path!r} has shape {(c, b)}')
  why = None if bias is not None else middle_stack_evidence(path, shapes)
  return middle_stack_message(path, shape, why) if why else None


def _stacked(scope: str, shapes: dict[str, tuple[int, ...]]):
  """The 3-D kernels and the 2-D norm scales and biases under ``scope``
  (attention's left out: its kernels are 3-D by nature)."""
  inside = [(p, sh) for p, sh in shapes.items()
            if p.startswith(scope) and not _ATTENTION.search(p)]
  kernels = [sh for p, sh in inside if len(sh) == 3 and p.endswith('/kernel')]
  norms = [sh for p, sh in inside if len(sh) == 2
           and p.rsplit('/', 1)[-1] in ('scale', 'bias')]
  return kernels, norms


def middle_stack_evidence(path: str, shapes: dict[str, tuple[int, ...]]
                          ) -> str | None:
  """Why the bias-free 3-D kernel at ``path`` looks stacked on its middle
  axis, or ``None``. A scan stacks every parameter of its module alike: on
  the leading axis, the 3-D kernels around it share their leading axis and
  the 2-D norm scales and biases start with it; on the middle axis
  (linen's ``nn.scan(variable_axes={'params': 1})``, MaxText's
  ``param_scan_axis=1``), they share the middle one and the norms end
  with it. The nearest module around the kernel (its parent's parent,
  then further up, the whole tree last) with another such parameter
  decides; where both readings fit there, nothing is said (a scope
  further up may mix stacks of other depths)."""
  parts = path.split('/')
  for depth in range(len(parts) - 2, -1, -1):
    scope = '/'.join(parts[:depth]) + '/' if depth else ''
    kernels, norms = _stacked(scope, shapes)
    if len(kernels) + len(norms) < 2:
      continue
    lead, mid = {k[0] for k in kernels}, {k[1] for k in kernels}
    leading = len(lead) == 1 and all(n[0] in lead for n in norms)
    # (L, d, d) stacks of other depths side by side share a middle axis
    # too: a stack on the middle axis is (in, L, out) with L ≠ out.
    middle = (len(mid) == 1 and min(mid) >= 2
              and any(k[1] != k[2] for k in kernels)
              and all(n[1] in mid for n in norms))
    if not middle or leading:
      return None
    norm_note = (f', and its {len(norms)} 2-D norm scales and biases end '
                 'with it' if norms else '')
    where = f'under {scope!r}' if scope else 'of the tree'
    return (f'the {len(kernels)} 3-D kernels {where} share their middle '
            f'axis, {min(mid)}, not their leading one{norm_note}')
  return None


def _read_as_stack(path: str, shape: tuple[int, ...]) -> str:
  a, b, c = shape
  return (f'parameter {path!r} of shape {shape} is read as {a} stacked '
          f'{b}x{c} matrices (the default rule for 3-D kernels: the leading '
          'axis is layers)')


def one_layer_message(path: str, shape: tuple[int, ...], evidence: str
                      ) -> str:
  a, b, c = shape
  pattern = _tree.exact_pattern(path)
  return (f'{_read_as_stack(path, shape)}, but {evidence}. If it is one '
          'layer (a 1-D convolution (window, in, out) whose name lacks '
          '"conv", or an attention output (heads, head_dim, features)), '
          + _two_rules(pattern, f'orthogonalize it as one {a * b}x{c} matrix',
                       'orthax.MatrixSpec.conv(3)',
                       'it is a stack of layers sharing one bias',
                       'orthax.MatrixSpec()'))


def middle_stack_message(path: str, shape: tuple[int, ...], evidence: str
                         ) -> str:
  a, b, c = shape
  pattern = _tree.exact_pattern(path)
  return (f'{_read_as_stack(path, shape)}, but {evidence}: its middle axis '
          f'may stack {b} layers of {a}x{c} '
          "(linen's nn.scan with variable_axes={'params': 1}, MaxText's "
          'param_scan_axis=1). If it does, '
          + _two_rules(pattern, 'orthogonalize each layer',
                       'orthax.MatrixSpec.stacked(1)',
                       'the leading axis stacks the layers',
                       'orthax.MatrixSpec()'))


def torch_layout_message(path: str, shape: tuple[int, ...],
                         shapes: dict[str, tuple[int, ...]]) -> str | None:
  """The warning for a 2-D leaf (or a stack of them) read in Flax's
  ``(in, out)`` layout although the bias beside it has the size of its
  first matrix axis, as PyTorch's and Equinox's ``(out, in)`` weights do,
  or ``None``: a square matrix, or no such bias (nothing tells); for a
  3-D leaf ``(a, b, c)`` also a bias ``(c, b)`` (a linen scan on the
  middle axis, :func:`stack_axis_message`'s) and ``b = 1`` (Equinox's
  depthwise 1-D convolution ``(out, 1, window)`` with its bias
  ``(out, 1)``)."""
  bias_path = _bias_beside(path)
  bias = shapes.get(bias_path)
  rows, cols = shape[-2:]
  if rows == cols or bias != shape[:-2] + (rows,):
    return None
  if len(shape) == 3 and (rows == 1 or bias == (cols, rows)):
    return None
  pattern = _tree.exact_pattern(path)
  return (f'parameter {path!r} of shape {shape} is read in Flax\'s kernel '
          f'layout, (in, out) = ({rows}, {cols}), but its bias {bias_path!r} '
          f'has {rows} outputs, the size of its first matrix axis: it may be '
          "a PyTorch or Equinox weight, (out, in), whose shape scale and "
          'per-neuron statistics would then be taken on the wrong sides. If '
          'it is, ' + _two_rules(
              pattern, 'view it as (out, in)',
              'orthax.MatrixSpec.torch_linear()', 'it is (in, out)',
              'orthax.MatrixSpec()')
          + " A model in PyTorch's layout throughout: "
          "orthax.Router(layout='torch').")


# Embedding tables whose rows are not the vocabulary (positions, token types,
# segments): BERT's 512 positions would otherwise make every 512-wide
# hidden matrix look like an output layer.
NOT_VOCABULARY = re.compile(
    r'(^|[/_])(pos|positions?|positional|wpe|token_type|type|segment|'
    r'relative_attention_bias)(?=[/_]|embed|$)|(?<!embed)_tokens?$')

ATTENTION_IN = re.compile(r'(^|/)(query|key|value)/kernel$')
ATTENTION_OUT = re.compile(r'(^|/)out/kernel$')


def heads_agree(in_shape: tuple[int, ...] | None,
                 out_shape: tuple[int, ...] | None) -> bool:
  """Whether a projection in ``(features, heads, head_dim)`` and an out
  kernel ``(heads, head_dim, features')`` share ``(heads, head_dim)``, and
  are not both one cube ``(n, n, n)`` (a stack of ``n`` layers of width
  ``n`` has that shape too)."""
  if not in_shape or not out_shape or len(in_shape) != 3 or len(
      out_shape) != 3:
    return False
  cube = len(set(in_shape)) == 1 and len(set(out_shape)) == 1
  return in_shape[1:] == out_shape[:2] and not cube


def attention_suspect(path: str, shape: tuple[int, ...],
                      shapes: dict[str, tuple[int, ...]]) -> str | None:
  """The warning for a 3-D kernel read as a stack of layers whose shape is
  that of Flax attention (:meth:`orthax.Router.attention_view_suspects`),
  or ``None``."""
  a, b, c = shape
  # One head too: (features, 1, head_dim) read as a stack is one row per
  # matrix. (One head's out kernel, a stack of one, is the matrix.)
  if ATTENTION_IN.search(path) and (b * c == a or heads_agree(
      shape, shapes.get(ATTENTION_IN.sub(r'\1out/kernel', path)))):
    return attention_message(
        path, shape, 'features, heads, head_dim',
        r'(^|/)(query|key|value)/kernel$', 'fan_in=0, fan_out=(1, 2)')
  if ATTENTION_OUT.search(path) and a > 1 and (a * b == c or any(
      heads_agree(shapes.get(ATTENTION_OUT.sub(rf'\1{name}/kernel', path)),
                  shape) for name in ('query', 'key', 'value'))):
    return attention_message(
        path, shape, 'heads, head_dim, features', r'(^|/)out/kernel$',
        'fan_in=(0, 1), fan_out=2')
  return None


def attention_message(path: str, shape: tuple[int, ...], layout: str,
                       pattern: str, view: str) -> str:
  return (f'{_read_as_stack(path, shape)}, but its shape is that of Flax '
          f'attention ({layout}). If it is, '
          + _two_rules(pattern, 'orthogonalize the whole projection',
                       f'orthax.MatrixSpec({view})',
                       'it is a stack of layers', 'orthax.MatrixSpec()'))


def missing_view_hint(path: str, shape: tuple[int, ...]) -> str:
  """For a leaf the default rules cannot view: the rule that views a
  scanned Flax attention kernel (a layer axis before Flax's layout), else,
  for a leaf of 4 or more axes, the rule that views it as a convolution
  kernel whose name lacks ``conv`` (``nnx.Sequential``'s ``layers/0``, a
  ``stem``, a ``shortcut``); ``''`` for fewer axes."""
  if len(shape) < 4:
    return ''
  pattern = _tree.exact_pattern(path)
  conv = (f' If it is a convolution kernel (window, in, out; conv kernels '
          'are recognised by a name containing "conv"), view it as one: '
          f'orthax.Rule({pattern!r}, "matrix", '
          f'orthax.MatrixSpec.conv({len(shape)})).')
  if len(shape) >= 5:
    layers = ', '.join(str(a) for a in range(1, len(shape) - 1))
    conv += (f' If its leading axis stacks {shape[0]} layers of '
             f'{len(shape) - 3}-D convolutions (nnx.vmap, nn.scan), one matrix '
             f'per layer: orthax.Rule({pattern!r}, "matrix", '
             f'orthax.MatrixSpec(fan_in=({layers}), '
             f'fan_out={len(shape) - 1})).')
  if len(shape) != 4:
    return conv
  if ATTENTION_IN.search(path):
    layout = 'layers, features, heads, head_dim'
  elif ATTENTION_OUT.search(path):
    layout = 'layers, heads, head_dim, features'
  else:
    return conv
  # Both rules at once: the out kernel would be the next error.
  rules = ', '.join(
      f'orthax.Rule({p.pattern!r}, "matrix", orthax.MatrixSpec({view}), '
      'ndims=(4,))' for p, view in (
          (ATTENTION_IN, 'fan_in=1, fan_out=(2, 3)'),
          (ATTENTION_OUT, 'fan_in=(1, 2), fan_out=3')))
  return (f' Its shape is that of scanned Flax attention ({layout}); one '
          'matrix per layer, for the query, key and value kernels and the '
          f'out kernel: router=orthax.Router(extra_rules=[{rules}]).')


def output_layer_message(path: str, reason: str) -> str:
  pattern = _tree.exact_pattern(path)
  return (f'parameter {path!r} goes to the matrix branch but looks like an '
          f'output layer ({reason}); output layers usually train better '
          f'with AdamW: route it there with router=orthax.Router(extra_rules='
          f'[orthax.Rule({pattern!r}, "adam")]), or keep it a matrix '
          f'without this warning with orthax.Rule({pattern!r}, "matrix").')


def natural_key(path: str) -> tuple:
  """Sort key reading digit runs as numbers (``Dense_2`` < ``Dense_10``)."""
  return tuple((0, int(t)) if t.isdigit() else (1, t)
               for t in re.split(r'(\d+)', path) if t)


class MatrixViewWarning(UserWarning):
  """A leaf's default matrix view may be the wrong one: a 3-D attention
  kernel shaped like Flax's ``(features, heads, head_dim)`` read as a stack
  of layers (:meth:`Router.attention_view_suspects`), a scanned stack of
  convolutions read as one (:meth:`Router.conv_view_suspects`), a 3-D
  kernel whose bias or neighbours say its layers are not the leading axis
  (:meth:`Router.stack_view_suspects`), or a PyTorch-layout ``(out, in)``
  weight read as ``(in, out)`` (:meth:`Router.layout_view_suspects`)."""


class OutputLayerWarning(UserWarning):
  """A 2-D leaf that looks like an output layer goes to the matrix branch
  (:meth:`Router.output_layer_suspects`)."""
