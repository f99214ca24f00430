"""Evaluation: benchmark specs (`eval/*.yaml`) → rollout engine → the training verifiers → metrics.

    spec.py       the benchmark spec schema, found by name in `eval/` or by path
    loaders.py    rows of each data format (jsonl/parquet/hub, Charades-STA, ActivityNet Captions, QVHighlights)
    metrics.py    pass@k (unbiased), maj@k, avg@k — pure functions
    grounding.py  temporal IoU, R1@IoU, mIoU and the official QVHighlights moment/highlight metrics — pure
    runner.py     a model on benchmarks (the same engine and Scorer as training), and prediction files
    report.py     results.json, the markdown table, per-sample JSONL and the pass@k plot
    cli.py        `posttrain eval`
"""
