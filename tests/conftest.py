"""Fixtures shared by the test files."""

import jax
import pytest


@pytest.fixture
def x64():
  """Enables ``jax_enable_x64`` for one test and restores the previous value."""
  old = jax.config.read('jax_enable_x64')
  jax.config.update('jax_enable_x64', True)
  yield
  jax.config.update('jax_enable_x64', old)
