"""Evaluation: benchmark specs (`eval/*.yaml`, schema in `posttrain.recipe.benchmark`) → rollout engine → the
training verifiers → metrics.

    metrics.py    pass@k (unbiased), maj@k, avg@k — pure functions
    grounding.py  temporal IoU, R1@IoU, mIoU and the official QVHighlights moment/highlight metrics — pure
    runner.py     a model on benchmarks (the same engine and Scorer as training)
    predictions.py  a predictions file scored with a benchmark's metrics (errors and counts)
    report.py     results.json, the markdown table, per-sample JSONL and the pass@k plot
    cli.py        `posttrain eval`
"""
