"""Recipes: the strict schema (`schema`, `scoring`, `benchmark`), YAML with line numbers (`yamlfile`), the
stage-kind registry (`kinds`, filled by `posttrain.stages`) and the loader (`load`)."""

from posttrain.recipe.load import Resolved, Stage, check_batch_geometry, check_files, load_recipe

__all__ = ["Resolved", "Stage", "check_batch_geometry", "check_files", "load_recipe"]
