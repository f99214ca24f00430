"""posttrain: composable LLM post-training from one YAML recipe.

Importing this package is cheap and CPU-safe: torch, transformers, vLLM and DeepSpeed are imported only
where they are used.
"""

__version__ = "0.1.0"
