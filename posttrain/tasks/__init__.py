"""Small built-in tasks (data generators) used by the quickstart and the tests."""
