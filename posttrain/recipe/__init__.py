"""Recipes: the strict schema (`schema`) and the loader (`load`)."""

from posttrain.recipe.load import Resolved, Stage, check_batch_geometry, check_files, check_rewards, load_recipe

__all__ = ["Resolved", "Stage", "check_batch_geometry", "check_files", "check_rewards", "load_recipe"]
