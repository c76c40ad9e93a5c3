"""Named recipes and their registry (one module per recipe family)."""

from orthax.recipes._common import assemble_with_adamw
from orthax.recipes._route import route
from orthax.recipes._common import step_stages
from orthax.recipes._common import assemble
from orthax.recipes._common import ADAMW_RATE_PER_MATRIX_RATE
from orthax.recipes._common import adam_rate_ratio
from orthax.recipes._common import recipe_routing
from orthax.recipes._common import RecipeRouting
from orthax.recipes._common import resolve_adam_learning_rate
from orthax.recipes.registry import default_learning_rates
from orthax.recipes.registry import LIBRARY_MODE
from orthax.recipes.registry import ModeRates
from orthax.recipes.registry import recipe
from orthax.recipes.registry import recipe_entry
from orthax.recipes.registry import recipe_factory
from orthax.recipes.registry import recipe_names
from orthax.recipes.registry import recipe_references
from orthax.recipes.registry import RecipeEntry
from orthax.recipes.registry import register
from orthax.recipes.registry import resolve_mode
from orthax.recipes.registry import resolve_reference
from orthax.recipes.registry import unregister
from orthax.recipes.muon import muon
from orthax.recipes.aro import aro
from orthax.recipes.dct_adamw import dct_adamw
from orthax.recipes.trion import trion
from orthax.recipes.fismo import fismo
from orthax.recipes.lanton import lanton
from orthax.recipes.namo import namo
from orthax.recipes.namo import namo_d
from orthax.recipes.normuon import normuon
from orthax.recipes.auon import auon
from orthax.recipes.auon import hybrid_auon
from orthax.recipes.robust import root
from orthax.recipes.robust import spectra

__all__ = [
    'assemble', 'assemble_with_adamw', 'default_learning_rates', 'route',
    'step_stages', 'muon', 'recipe', 'recipe_entry',
    'recipe_factory', 'recipe_names', 'recipe_references', 'RecipeEntry',
    'register', 'resolve_mode', 'resolve_reference',
    'unregister',
    'LIBRARY_MODE', 'ModeRates',
    'dct_adamw', 'trion',
    'aro', 'fismo', 'lanton', 'namo', 'namo_d', 'normuon',
    'auon', 'hybrid_auon', 'root', 'spectra',
]
