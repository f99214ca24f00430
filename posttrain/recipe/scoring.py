"""How a stage scores its completions, as the recipe declares it: `rewards:` entries (`RewardSpec`) and the
pairwise `judge:` of an SPO stage (`JudgeSpec`). Schema only: the verifiers are resolved and run by
`posttrain.reward` (registry, Scorer) and the judges by `posttrain.judges`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class RewardSpec(BaseModel):
    """One reward of a recipe: which verifier, its weight in the total, and how failures score."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="built-in, @register name, entry point, or module:function")
    weight: float = Field(1.0, description="its weight in the total: Σ_k weight_k · r_k over non-abstaining k")
    fallback: float | None = Field(0.0, description="score on an exception, timeout or non-finite result "
                                                    "(None: abstain instead)")
    timeout: float = Field(10.0, gt=0, description="seconds one row may take in its worker before it is killed")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="the verifier's settings (functools.partial)")
    label: str | None = Field(None, description="name in metrics and results; default: `name`, or the "
                                                "function name of a `module:function` reference")
    max_failure_share: float | None = Field(0.5, ge=0, le=1, description="stop with an error when more than this "
                                            "share of the rows of `failure_patience` scoring batches in a row failed "
                                            "or timed out (a broken verifier would otherwise train on fallbacks for "
                                            "ever); None: never stop")
    failure_patience: int = Field(3, gt=0, description="scoring batches in a row over `max_failure_share` before "
                                                       "the stage stops")

    @field_validator("weight", "fallback")
    @classmethod
    def _finite(cls, value):
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @property
    def key(self) -> str:
        """The reward's name in `per_reward` and in metrics (`reward/<key>/mean`)."""
        if self.label:
            return self.label
        return self.name.rpartition(":")[2] if ":" in self.name else self.name


DEFAULT_TEMPLATE = (
    "Which response is the better reply to the user's message: more helpful, correct and clear?\n\n"
    "[User message]\n{prompt}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\n"
    "Reply with one letter only: A if Response A is better, B if Response B is better."
)

_COMMON = {"kind", "symmetrize"}
_SETTINGS = {  # the keys each kind takes besides _COMMON; any other key given is an error
    "rule": {"reward"},
    "reward_model": {"path", "dtype", "render", "batch_size", "max_length"},
    "llm": {"path", "dtype", "render", "system_prompt", "template", "verdict_a", "verdict_b", "samples",
            "temperature", "max_tokens"},
}


class JudgeSpec(BaseModel):
    """`stages.<name>.judge` of an `spo` stage: which pairwise judge, and its settings (see the module doc)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["rule", "reward_model", "llm"]
    symmetrize: bool = Field(True, description="P_ij = ½(J_ij + 1 − J_ji) against position bias; an llm judge "
                                               "then judges both orders, G(G−1) judgments per prompt")
    # rule
    reward: RewardSpec | None = Field(None, description="rule: the verifier whose scores decide each pair "
                                                        "(its weight is ignored)")
    # reward_model, llm
    path: str | None = Field(None, description="reward_model: the sequence-classification checkpoint (1 logit); "
                                               "llm: a separate judge model (default: the policy itself)")
    dtype: Literal["fp32", "bf16", "fp16"] | None = Field(None, description="dtype of the model at `path`; "
                                                                            "default: the recipe's model.dtype")
    render: Literal["chat", "plain"] = Field("chat", description="chat: through the judge tokenizer's chat "
                                                                 "template; plain: raw text")
    # reward_model
    batch_size: int = Field(16, gt=0, description="reward_model: sequences per forward pass")
    max_length: int = Field(2048, gt=1, description="reward_model: tokens per sequence (cut from the left)")
    # llm
    system_prompt: str | None = Field(None, description="llm: system message of the judge prompt (render: chat)")
    template: str = Field(DEFAULT_TEMPLATE, description="llm: the judge prompt, with {prompt}, {a} and {b}")
    verdict_a: str = Field("A", min_length=1, description="llm: the reply naming the first response (a)")
    verdict_b: str = Field("B", min_length=1, description="llm: the reply naming the second response (b)")
    samples: int = Field(1, gt=0, description="llm: verdicts sampled per pair and averaged (needs temperature > 0)")
    temperature: float = Field(0.0, ge=0, description="llm: 0 is greedy")
    max_tokens: int = Field(16, gt=0, description="llm: tokens the judge may write")

    @model_validator(mode="after")
    def _fits_kind(self):
        stray = sorted(self.model_fields_set - _COMMON - _SETTINGS[self.kind])
        if stray:
            valid = ", ".join(sorted(_COMMON - {"kind"} | _SETTINGS[self.kind]))
            raise ValueError(f"{', '.join(f'`{s}`' for s in stray)}: not a setting of a `{self.kind}` judge "
                             f"(its settings: {valid})")
        if self.kind == "rule" and self.reward is None:
            raise ValueError("a `rule` judge needs `reward:`, the verifier whose scores decide each pair, "
                             "e.g. `reward: {name: exact}`")
        if self.kind == "reward_model" and self.path is None:
            raise ValueError("a `reward_model` judge needs `path:`, a sequence-classification checkpoint (1 logit)")
        if self.kind == "llm":
            missing = [p for p in ("{prompt}", "{a}", "{b}") if p not in self.template]
            if missing:
                raise ValueError(f"`template` must contain {{prompt}}, {{a}} and {{b}}; it lacks {', '.join(missing)}")
            if self.verdict_a == self.verdict_b:
                raise ValueError(f"`verdict_a` and `verdict_b` are both {self.verdict_a!r}")
            if self.samples > 1 and self.temperature == 0:
                raise ValueError(f"`samples: {self.samples}` needs `temperature` > 0 (greedy verdicts are all equal)")
        return self
