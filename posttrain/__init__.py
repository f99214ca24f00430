"""posttrain: composable LLM post-training from one YAML recipe.

Importing this package is cheap and CPU-safe: torch, transformers, vLLM and DeepSpeed are imported only
where they are used.

Layers, lowest first. A module imports only from its own layer or the layers below it, never up, and no
modules import each other in a circle (`tests/test_layers.py` checks both over every import in the source):

    foundation   errors, datatypes (the shared nouns), checkpoint files, trackers
    recipe       the schema of recipes and benchmark specs, YAML loading, the stage-kind registry (filled by
                 the stages layer: the schema never imports a stage)
    data         rows and prompts (data), annotation files (annotations), video decoding and processing (video)
    components   the math (algorithms), verifiers (rewards) and their registry/Scorer/pool (reward), rollout
                 engines (rollout), model loading and building (models, modeling), synthetic tasks (tasks)
    learner      the learner (model + optimizer) and the SPO judges (models that score completions)
    stages       one loop per stage kind (stages) and, beside them, evaluation
    pipeline     stages in order, the run directory, resume
    cli          the commands: train, eval, validate, score, plot
"""

__version__ = "0.1.0"

LAYERS = (
    ("foundation", ("posttrain.errors", "posttrain.datatypes", "posttrain.checkpoint", "posttrain.tracking")),
    ("recipe", ("posttrain.recipe",)),
    ("data", ("posttrain.annotations", "posttrain.data", "posttrain.video")),
    ("components", ("posttrain.algorithms", "posttrain.rewards", "posttrain.reward", "posttrain.rollout",
                    "posttrain.models", "posttrain.modeling", "posttrain.tasks")),
    ("learner", ("posttrain.learner", "posttrain.judges")),
    ("stages", ("posttrain.stages", "posttrain.evaluation")),
    ("pipeline", ("posttrain.pipeline",)),
    ("cli", ("posttrain.cli", "posttrain.__main__", "posttrain.score", "posttrain.plot")),
)
