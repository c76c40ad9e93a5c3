"""The command-line tools: ``orthax-train``, ``orthax-compare``,
``orthax-sweep`` and ``orthax-prepare-data`` (entry points of the
distribution; ``scripts/*.py`` call the same functions).

Each tool is one module with ``define_flags()`` (its absl flags, defined
when the tool runs rather than on import, so that the modules import side
by side) and ``run(argv=None)``. They need the ``scripts`` extra
(``pip install 'orthax-optim[scripts]'``). ``--config`` takes a packaged
config by name from any directory (``--config=lm_cpu:normuon``; see
:mod:`orthax.configs`) or a path.

A bad config or input (a ``ValueError``: an unknown key, a value out of
range, a missing token file, a workdir that holds another run) ends the
tool with one ``<tool>: error: <message>`` line on stderr and exit status 2;
a run that turns non-finite (``FloatingPointError``, a
:class:`orthax.NonFiniteGradientError`) or whose every checkpoint is damaged
with that line and status 1; a run that Ctrl-C stopped, after it
checkpointed its current step, with one line and status 130. Set
``ORTHAX_TRACEBACK=1`` for the traceback instead.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from typing import Any, Callable, Sequence

from orthax import _extras
from orthax import configs as packaged_configs
from orthax.transforms.check_finite import NonFiniteGradientError

EXIT_USAGE = 2     # a bad config, flag or input file (argparse's status)
EXIT_FAILURE = 1   # the run itself failed (its loss turned non-finite)
EXIT_INTERRUPTED = 130  # Ctrl-C, after the run saved: 128 + SIGINT


def require_scripts_extra(tool: str) -> None:
  """Exits with a message naming the extra if a module of the ``scripts``
  extra is missing (the core package does not depend on them). Nothing of
  :mod:`orthax.train` is imported before this check."""
  module = _extras.missing_module()
  if module is not None:
    sys.exit(_extras.scripts_extra_message(tool, module))


def config_argv(argv: Sequence[str]) -> list[str]:
  """``argv`` with each ``--config`` value given by packaged name resolved
  to its file (:func:`orthax.configs.resolve`); raises ``ValueError``
  naming the value and the packaged configs when it is neither, or the
  optimizers when a packaged config's ``:<optimizer>`` is none."""
  out, argv = [], list(argv)
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      a = '--config=' + _config_file(a[len('--config='):])
    elif i > 0 and argv[i - 1] == '--config':
      a = _config_file(a)
    out.append(a)
  return out


def _config_file(value: str) -> str:
  resolved = packaged_configs.resolve(value)
  path, _, arg = resolved.partition(':')
  if not os.path.isfile(path):
    raise ValueError(
        f'--config={value}: no such file, and no packaged config of that '
        f'name (packaged: {", ".join(packaged_configs.names())}).')
  if arg and os.path.dirname(os.path.abspath(path)) == (
      packaged_configs.DIRECTORY):
    # pylint: disable=g-import-not-at-top
    from orthax.train import configs as train_configs
    if arg not in train_configs.optimizer_names():
      raise ValueError(
          f'--config={value}: {arg!r} is not an optimizer; a packaged '
          f'config takes one of {", ".join(train_configs.optimizer_names())}.')
  return resolved


def run_app(tool: str, doc: str, define_flags: Callable[[], Any],
            main: Callable[[Any], None],
            argv: Sequence[str] | None = None) -> None:
  """Defines the tool's flags and runs ``main(flags)`` under
  ``absl.app`` with ``argv`` (default ``sys.argv``) after
  :func:`config_argv`; ``--help`` shows ``doc`` and the tool's flags."""
  require_scripts_extra(tool)
  # pylint: disable=g-import-not-at-top
  from absl import app
  from absl import flags
  argv = list(sys.argv if argv is None else argv)
  main_module = sys.modules['__main__']
  if not getattr(main_module, '__doc__', None):  # an entry point's wrapper
    main_module.__doc__ = doc
  try:
    holders = define_flags()
  except (AttributeError, KeyError) as e:
    # ml_collections applies the --config.<key> overrides as it defines
    # the flag: a key the config lacks ended in a traceback (exit 1).
    if _traceback_wanted() or _missing_key(e) is None:
      raise
    _report(tool, _missing_key(e), EXIT_USAGE)
  for holder in vars(holders).values():  # listed by --help, not --helpfull
    flags.FLAGS.register_flag_by_module(argv[0], flags.FLAGS[holder.name])
  try:
    argv = config_argv(argv)
  except ValueError as e:
    if _traceback_wanted():
      raise
    _report(tool, e, EXIT_USAGE)
  app.run(lambda _: report_errors(tool, main, holders), argv=argv,
          flags_parser=lambda args: _parse_flags(tool, args))


def _parse_flags(tool: str, argv: list[str]) -> list[str]:
  """absl's flag parsing, a bad value (``--config.train.steps=abc``, a
  config file that fails to load) said as one ``error:`` line with
  :data:`EXIT_USAGE` (absl's own ``FATAL Flags parsing error`` exits 1,
  the status of a failed run)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  argv, nones = _none_overrides(argv, set(flags.FLAGS))
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    if _traceback_wanted():
      raise
    # A config file's error carries its traceback: its first line and the
    # exception it ends with.
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    _report(tool, ' '.join(lines[:1] + lines[-1:] if len(lines) > 1
                           else lines), EXIT_USAGE)
  except Exception as e:  # pylint: disable=broad-except
    # A config file that raised while it was read (absl wraps only some),
    # or an override of a key the config lacks.
    if _traceback_wanted():
      raise
    _report(tool, _missing_key(e) or f'a config file failed to load: '
            f'{_where(e)}{type(e).__name__}: {e}', EXIT_USAGE)
  try:
    for name, path in nones:
      _set_none(flags.FLAGS[name].value, name, path)
  except ValueError as e:
    if _traceback_wanted():
      raise
    _report(tool, e, EXIT_USAGE)
  return rest


_NONE = re.compile(r'--(\w+)\.([\w.]+)=(None|none)')
_OVERRIDE = re.compile(r'--(\w+)\.([\w.]+)=')


def _none_overrides(argv: list[str], defined: set[str]
                    ) -> tuple[list[str], list[tuple]]:
  """``argv`` without its ``--<config>.<key>=None`` overrides, and those
  ``(config, key)`` (absl's parser turns ``'None'`` into a float or a
  string by the field's type; ``None`` gives a key back to the optimizer's
  own default, e.g. ``optimizer.adam_learning_rate``). A later override of
  the same key wins, as absl's do; a flag not in ``defined`` is left for
  absl to name."""
  keep, nones = [], {}
  for arg in argv:
    m = _NONE.fullmatch(arg)
    if m and m.group(1) in defined:
      nones[m.groups()[:2]] = None
      continue
    m = _OVERRIDE.match(arg)
    if m:
      nones.pop(m.groups(), None)
    keep.append(arg)
  return keep, list(nones)


def _set_none(config: Any, name: str, path: str) -> None:
  if not hasattr(config, 'get'):
    raise ValueError(f'flag --{name}.{path}=None: --{name} is not a config '
                     'flag.')
  *parents, last = path.split('.')
  holder = config
  for key in parents:
    holder = holder.get(key) if hasattr(holder, 'get') else None
  if holder is None or not hasattr(holder, 'get') or last not in holder:
    raise ValueError(f'flag --{name}.{path}=None: the config has no key '
                     f'{path!r}.')
  holder[last] = None


def _missing_key(e: Exception) -> str | None:
  """What ``e`` says, when ml_collections raised it on a ``--config.<key>``
  override of a key the config lacks (an ``AttributeError`` or a
  ``KeyError`` from its ``ConfigDict``); else ``None``."""
  frames = traceback.extract_tb(e.__traceback__)
  if not (isinstance(e, (AttributeError, KeyError)) and frames
          and 'ml_collections' in frames[-1].filename):
    return None
  text = str(e.args[0] if e.args else e).replace('\\n', ' ')
  what = ' '.join(re.sub(r"\\'|[\"']", '', text).split())
  return f'a --config.<key> override names a key the config lacks: {what}'


def _where(e: Exception) -> str:
  """``'<file>, line <n>: '`` of where ``e`` was raised (a syntax error's
  own place), or ``''``."""
  if isinstance(e, SyntaxError) and e.filename:
    return f'{e.filename}, line {e.lineno}: '
  frames = traceback.extract_tb(e.__traceback__)
  return f'{frames[-1].filename}, line {frames[-1].lineno}: ' if frames else ''


def report_errors(tool: str, main: Callable[[Any], None], holders: Any
                  ) -> None:
  """``main(holders)``; a ``ValueError`` (bad config or input) exits with
  ``<tool>: error: <message>`` on stderr and :data:`EXIT_USAGE`, a
  ``FloatingPointError`` (non-finite loss) with the same line and
  :data:`EXIT_FAILURE`: no traceback, unless the environment sets
  ``ORTHAX_TRACEBACK=1``. (:class:`orthax.NonFiniteGradientError`, the
  trainer's ``nonfinite='raise'``, is a ``ValueError`` and a run failure:
  it exits with :data:`EXIT_FAILURE`; so does a
  :class:`~orthax.train.checkpoint.DamagedCheckpointError`, every
  checkpoint of the run damaged.) A run stopped by Ctrl-C after saving
  (:class:`~orthax.train.faults.Interrupted`) says so in one line and exits
  with :data:`EXIT_INTERRUPTED`."""
  # pylint: disable=g-import-not-at-top
  # (imported here: orthax.train needs the scripts extra, which
  # require_scripts_extra checks first)
  from orthax.train.checkpoint import DamagedCheckpointError
  from orthax.train.faults import Interrupted
  try:
    main(holders)
  except Interrupted as e:
    if _traceback_wanted():
      raise
    print(f'{tool}: {e}', file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)
  except (ValueError, FloatingPointError, DamagedCheckpointError) as e:
    if _traceback_wanted():
      raise
    failed = isinstance(e, (FloatingPointError, NonFiniteGradientError,
                            DamagedCheckpointError))
    _report(tool, e, EXIT_FAILURE if failed else EXIT_USAGE)


def _traceback_wanted() -> bool:
  return os.environ.get('ORTHAX_TRACEBACK', '') not in ('', '0')


def _report(tool: str, error: Exception, status: int) -> None:
  print(f'{tool}: error: {error}\n{tool}: (ORTHAX_TRACEBACK=1 shows where '
        'it was raised)', file=sys.stderr)
  sys.exit(status)


def output_dir(flag: str, path: str | None, create: bool = True
               ) -> str | None:
  """Creates the directory ``--flag`` names (``None`` passes) before any
  work starts, so that a path that cannot be one fails first, as a
  ``ValueError`` naming the flag, not as a traceback after the training
  (``create=False``: only refuses an existing file, leaving the creation
  to the tool, which checks its config first: then a path that cannot
  become a directory, an empty one, a file on its way or a directory that
  cannot be written, is refused here)."""
  if path is None:
    return None
  if not path:
    raise ValueError(f'--{flag}: the path is empty.')
  if not create:
    if os.path.isfile(path):
      raise ValueError(f'--{flag}: {path!r} is a file, not a directory.')
    nearest = os.path.abspath(path)  # the part that exists
    while not os.path.exists(nearest):
      nearest = os.path.dirname(nearest)
    if not os.path.isdir(nearest):
      raise ValueError(f'--{flag}: {path!r} cannot be created ({nearest!r} '
                       'is a file).')
    if not os.access(nearest, os.W_OK | os.X_OK):
      raise ValueError(f'--{flag}: {path!r} cannot be written ({nearest!r} '
                       'is not writable).')
    return path
  try:
    os.makedirs(path, exist_ok=True)
  except (FileExistsError, NotADirectoryError, PermissionError) as e:
    what = ('is a file, not a directory' if os.path.isfile(path)
            else f'cannot be created ({e.strerror or e})')
    raise ValueError(f'--{flag}: {path!r} {what}.') from None
  return path


def parse_list(flag: str, values: Sequence[str], kind: type) -> list:
  """``values`` of the list flag ``--flag`` as ``kind`` (``int`` or
  ``float``); a ``ValueError`` names the flag and the value."""
  out = []
  for v in values:
    try:
      out.append(kind(v))
    except ValueError:
      what = 'an integer' if kind is int else 'a number'
      raise ValueError(f'--{flag}: {v!r} is not {what}.') from None
  return out


def quiet_library_logs() -> None:
  """WARNING and above from the libraries unless ``--verbosity`` was given.

  Under ``absl.app`` every INFO line of JAX (its probing for a TPU backend)
  and orbax (about 40 per checkpoint) reaches the terminal and breaks the
  progress line. This raises absl's verbosity to WARNING when the command
  line did not set it, and keeps the trainer's own INFO notes
  (``orthax.train``: e.g. which checkpoint a run resumed from).
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS['verbosity'].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('orthax.train').setLevel(logging.INFO)
