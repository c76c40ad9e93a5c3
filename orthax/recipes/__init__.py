"""Named recipes and their registry (one module per recipe family)."""

from orthax.recipes.registry import assemble
from orthax.recipes.registry import recipe
from orthax.recipes.registry import recipe_factory
from orthax.recipes.registry import recipe_names
from orthax.recipes.registry import recipe_references
from orthax.recipes.registry import register
from orthax.recipes.muon import muon

__all__ = [
    'assemble', 'muon', 'recipe', 'recipe_factory', 'recipe_names',
    'recipe_references', 'register',
]
