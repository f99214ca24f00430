"""TTCS, test-time curriculum synthesis (arXiv 2601.22628): the rewards of its two policies, as pure functions.

A synthesizer writes variants of unlabeled test questions; a solver answers test and synthetic questions. No
ground truth is read anywhere: the solver's labels are its own majority votes.

Solver (GRPO on G samples of a question, answers a_1 … a_G, `None` when no answer can be extracted):
    label  = the most common non-None answer (ties: the one voted first)          `majority_vote`
    r_i    = 1[a_i = label]
    s      = (1/G) Σ_i r_i                                                        agreement
    keep the group only if agreement_low ≤ s ≤ agreement_high  (default [0.25, 0.75])   `agreement_mask`

Synthesizer (GRPO on G' candidate variants of one source question q):
    s      = majority share of the solver's M answers to the candidate (None counts as an answer; a None majority
             gives s = 0)
    R_unc  = (4 s (1 − s))^γ,  γ = 1.2                       1 at s = ½, 0 at s ∈ {0, 1}; s = 0.6 → 0.952194
             or, with `capability_reward: triangle` (the official code's other option, R-Zero's form),
    R_unc  = 1 − 2 |s − ½|                                   1 at s = ½, 0 at s ∈ {0, 1}; s = 0.6 → 0.8
    R_sim  = R_unc · max(0, 1 − sim) if the candidate is too close to q (`too_similar`), else R_unc
    R      = max(0, R_sim − |cluster(c)| / |batch|)           clusters of near-duplicates in the batch
    R      = 0 when no `<question>` can be parsed

Similarity to the source (official `is_bad_case`): a difflib ratio over the lowercased texts above a threshold
that falls with length (0.88 under 100 characters, 0.78 under 200, 0.68 under 400, else 0.6); and (optional,
`skeleton_check`) the "math skeleton" (digits → N, single letters → V) ratio above 0.9 together with a text ratio
above 0.45 or a word Jaccard above 0.4. Diversity (official reward manager): distance 1 − sentence BLEU (4-gram,
ε-smoothed), average-linkage agglomerative clustering cut at distance 0.5.

Where this departs from the official code: the candidate does not have to carry its own `\\boxed{}` answer
(it is never used in the reward); answers are grouped by normalised string (`evaluation.metrics.vote_key`), not
by a symbolic grader; BLEU is symmetrised (mean of both directions) so the distance matrix is symmetric.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections import Counter
from typing import Literal, Sequence

from posttrain.algorithms import grpo
from posttrain.algorithms.voting import majority_index


@dataclasses.dataclass(frozen=True)
class Args(grpo.Args):
    """The solver's GRPO settings (TTCS defaults: token-mean, clip 0.2, unbiased std) plus the TTCS knobs."""

    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = dataclasses.field(
        default="token-mean", metadata={"doc": "TTCS (verl): token-mean"}
    )
    agreement_low: float = dataclasses.field(
        default=0.25, metadata={"doc": "solver groups train only if their agreement with the majority is ≥ this",
                                "ge": 0, "le": 1}
    )
    agreement_high: float = dataclasses.field(
        default=0.75, metadata={"doc": "... and ≤ this", "ge": 0, "le": 1}
    )
    synthetic_per_step: int = dataclasses.field(
        default=8, metadata={"doc": "synthetic questions in each solver batch (beside prompts_per_step test ones)",
                             "ge": 0}
    )
    solver_steps: int = dataclasses.field(
        default=1, metadata={"doc": "solver GRPO steps per iteration (each on fresh test questions; the "
                             "iteration's variants are shared out between them)", "gt": 0}
    )
    judge_samples: int = dataclasses.field(
        default=10, metadata={"doc": "M: solver answers per candidate question for the synthesizer's reward",
                              "gt": 0}
    )
    bell_exponent: float = dataclasses.field(
        default=1.2, metadata={"doc": "γ of the uncertainty reward (4s(1−s))^γ", "gt": 0}
    )
    capability_reward: Literal["bell", "triangle"] = dataclasses.field(
        default="bell", metadata={"doc": "the synthesizer's uncertainty reward: `bell` (4s(1−s))^γ or `triangle` "
                                         "1 − 2|s − ½| (R-Zero's form)"}
    )
    skeleton_check: bool = dataclasses.field(
        default=True, metadata={"doc": "also flag candidates whose math skeleton (digits→N) copies the source"}
    )
    diversity_threshold: float = dataclasses.field(
        default=0.5, metadata={"doc": "BLEU distance below which candidates cluster as near-duplicates",
                               "ge": 0, "le": 1}
    )
    diversity_tokens: Literal["words", "chars"] = dataclasses.field(
        default="words", metadata={"doc": "BLEU tokens: whitespace words (official) or characters (formulas)"}
    )
    label_column: str | None = dataclasses.field(
        default=None, metadata={"doc": "monitoring only: a column with true answers, never used for training"}
    )


# ------------------------------------------------------------------------------------------- solver


def majority_vote(keys: Sequence[str | None]) -> tuple[str | None, float]:
    """(label, agreement): the most common non-None key (ties: voted first, as `maj@k` in evaluation) and the
    share of all samples that voted for it; (None, 0.0) when no sample has an answer."""
    index = majority_index(list(keys))
    if index is None:
        return None, 0.0
    return keys[index], sum(k == keys[index] for k in keys) / len(keys)


def pseudo_rewards(keys: Sequence[str | None], label: str | None) -> list[float]:
    return [float(label is not None and k == label) for k in keys]


def agreement_mask(agreements: Sequence[float], low: float, high: float) -> list[bool]:
    """Groups that train: agreement within [low, high] (inclusive; the official filter)."""
    return [low <= a <= high for a in agreements]


# -------------------------------------------------------------------------------------- synthesizer


def bell_reward(share: float, exponent: float = 1.2) -> float:
    """`(4 s (1 − s))^γ`: largest when the solver is split, 0 when it always or never agrees."""
    return max(4.0 * share * (1.0 - share), 0.0) ** exponent


def triangle_reward(share: float) -> float:
    """`1 − 2 |s − ½|`: the same end points as `bell_reward`, linear in between (R-Zero's uncertainty reward)."""
    return max(1.0 - 2.0 * abs(share - 0.5), 0.0)


def capability_reward(share: float, args: Args) -> float:
    """The uncertainty reward R_unc the recipe chose (`args.capability_reward`)."""
    return triangle_reward(share) if args.capability_reward == "triangle" else bell_reward(share, args.bell_exponent)


_NO_ANSWER = "\0none"  # stands in for None where a missing answer must be able to win the vote


def judge_share(keys: Sequence[str | None]) -> float:
    """Majority share for the synthesizer's reward: None is an answer too, and a None majority gives 0."""
    label, share = majority_vote([_NO_ANSWER if k is None else k for k in keys])
    return 0.0 if label in (None, _NO_ANSWER) else share


_QUESTION = re.compile(r"<question>(.*?)</question>", re.DOTALL)


def parse_question(text: str) -> str | None:
    """The last `<question>…</question>` of a synthesizer output, stripped; None when there is none (or empty)."""
    found = [m.strip() for m in _QUESTION.findall(text)]
    return found[-1] if found and found[-1] else None


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def _length_threshold(n: int) -> float:
    return 0.88 if n < 100 else 0.78 if n < 200 else 0.68 if n < 400 else 0.6


_MATH = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_STOP = frozenset("a an the of to in is and or for on at by with be that this what find if are as from it".split())


def _skeleton(text: str) -> str:
    parts = ["".join(g for g in m.groups() if g) for m in _MATH.finditer(text)] or [text]
    s = re.sub(r"\s+", "", " ".join(parts).lower())
    s = re.sub(r"\d+(?:\.\d+)?", "N", s)
    return re.sub(r"(?<![a-z\\])[a-z](?![a-z])", "V", s)


def _jaccard(a: str, b: str) -> float:
    x = {w for w in re.findall(r"[a-z]+", a) if w not in _STOP}
    y = {w for w in re.findall(r"[a-z]+", b) if w not in _STOP}
    return len(x & y) / len(x | y) if x | y else 0.0


def too_similar(candidate: str, source: str, skeleton_check: bool = True) -> tuple[bool, float]:
    """(flagged, score): whether the candidate copies its source question, and the similarity that scales its
    reward by `1 − score` (see module doc). Texts under 5 characters are never flagged."""
    a, b = _clean(candidate), _clean(source)
    if min(len(a), len(b)) < 5:
        return False, 0.0
    ratio = difflib.SequenceMatcher(None, a, b).ratio()
    if ratio > _length_threshold(min(len(a), len(b))):
        return True, ratio
    if skeleton_check:
        skeleton = difflib.SequenceMatcher(None, _skeleton(candidate), _skeleton(source)).ratio()
        if skeleton > 0.9 and (ratio > 0.45 or _jaccard(a, b) > 0.4):
            return True, skeleton
    return False, ratio


def sentence_bleu(hypothesis: list[str], reference: list[str], max_n: int = 4, eps: float = 0.1) -> float:
    """BLEU of one token list against one reference: geometric mean of clipped n-gram precisions (n ≤ 4,
    a zero count becomes ε, as NLTK's smoothing method 1) times the brevity penalty."""
    if not hypothesis or not reference:
        return 0.0
    logs = []
    for n in range(1, max_n + 1):
        hyp = Counter(tuple(hypothesis[i : i + n]) for i in range(len(hypothesis) - n + 1))
        ref = Counter(tuple(reference[i : i + n]) for i in range(len(reference) - n + 1))
        total = max(sum(hyp.values()), 1)
        match = sum(min(c, ref[g]) for g, c in hyp.items())
        logs.append(math.log((match if match else eps) / total))
    bp = 1.0 if len(hypothesis) > len(reference) else math.exp(1 - len(reference) / len(hypothesis))
    return bp * math.exp(sum(logs) / max_n)


def cluster_sizes(texts: Sequence[str], threshold: float = 0.5, tokens: str = "words") -> list[int]:
    """Size of each text's near-duplicate cluster: average-linkage agglomerative clustering on the distance
    `1 − BLEU` (mean of both directions), merging while the closest clusters are nearer than `threshold`."""
    split = (lambda t: t.split()) if tokens == "words" else list
    toks = [split(t) for t in texts]
    n = len(texts)
    dist = [[0.0 if i == j else 1.0 - 0.5 * (sentence_bleu(toks[i], toks[j]) + sentence_bleu(toks[j], toks[i]))
             for j in range(n)] for i in range(n)]
    clusters = [[i] for i in range(n)]
    while len(clusters) > 1:
        best, pair = None, None
        for x in range(len(clusters)):
            for y in range(x + 1, len(clusters)):
                d = sum(dist[i][j] for i in clusters[x] for j in clusters[y]) / (len(clusters[x]) * len(clusters[y]))
                if best is None or d < best:
                    best, pair = d, (x, y)
        if best >= threshold:
            break
        x, y = pair
        clusters[x] += clusters.pop(y)
    size = [0] * n
    for c in clusters:
        for i in c:
            size[i] = len(c)
    return size


def synthesizer_rewards(candidates: Sequence[str | None], sources: Sequence[str], shares: Sequence[float],
                        args: Args) -> tuple[list[float], dict[str, float]]:
    """Rewards of a batch of synthesizer outputs: `candidates[i]` the parsed question (None: unparsable),
    `sources[i]` its test question, `shares[i]` the solver's majority share on it. Returns the rewards and
    monitoring counts (`valid`, `too_similar`, mean diversity penalty)."""
    # the diversity penalty runs over the whole batch, unparsable outputs included (as empty texts)
    sizes = cluster_sizes([c or "" for c in candidates], args.diversity_threshold, args.diversity_tokens)
    rewards, similar = [], 0
    for c, q, s, size in zip(candidates, sources, shares, sizes):
        if c is None:
            rewards.append(0.0)
            continue
        r = capability_reward(s, args)
        flagged, score = too_similar(c, q, args.skeleton_check)
        if flagged:
            similar += 1
            r *= max(0.0, 1.0 - score)
        rewards.append(max(0.0, r - size / len(candidates)))
    valid = sum(c is not None for c in candidates)
    penalty = sum(s / len(candidates) for s in sizes) / max(len(candidates), 1)
    return rewards, {"valid_rate": valid / max(len(candidates), 1), "too_similar": similar / max(valid, 1),
                     "diversity_penalty": penalty}
