"""THE MATH: one module of pure tensor functions per paper, plus shared ops.

Each module exposes `Args` (a frozen dataclass whose defaults are the paper's setting), its credit
assignment, and `loss(...) -> LossOutput` (per-token). Nothing here owns a model or an optimizer.
"""
