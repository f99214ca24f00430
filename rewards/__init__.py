"""Built-in verifiers: plain functions, no torch. Installed as `posttrain.rewards` (see pyproject)."""
