"""TTCS: golden values of both policies' rewards, no ground truth in the loop, two-policy checkpoints and resume."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from helpers import run_two_steps, tiny_overrides, ttcs_recipe as _ttcs_recipe, write_addition_data, write_recipe
from posttrain import pipeline
from posttrain.algorithms import ttcs
from posttrain.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ golden values


def test_bell_reward_golden_values():
    assert ttcs.bell_reward(0.6) == pytest.approx(0.952194, abs=1e-6)  # ALGORITHMS.md
    assert ttcs.bell_reward(0.5) == pytest.approx(1.0)
    assert ttcs.bell_reward(0.0) == 0.0 and ttcs.bell_reward(1.0) == 0.0
    assert ttcs.bell_reward(0.3) == pytest.approx((4 * 0.3 * 0.7) ** 1.2)
    assert ttcs.bell_reward(0.6, exponent=1.0) == pytest.approx(0.96)


def test_triangle_reward_golden_values_and_its_use_in_the_synthesizer_reward():
    # 1 − 2|s − ½| by hand: s = 0.6 → 0.8, 0.3 → 0.6, 0.5 → 1, 0 and 1 → 0
    assert [ttcs.triangle_reward(s) for s in (0.6, 0.3, 0.5, 0.0, 1.0)] == pytest.approx([0.8, 0.6, 1.0, 0.0, 0.0])
    triangle = ttcs.Args(capability_reward="triangle", skeleton_check=False)
    candidates, source = ["p q r s t", "a completely different problem here"], "the source question is this one"
    rewards, _ = ttcs.synthesizer_rewards(candidates, [source] * 2, [0.6, 0.3], triangle)
    assert rewards == pytest.approx([0.8 - 1 / 2, 0.6 - 1 / 2])  # each its own cluster: penalty 1/2
    bell, _ = ttcs.synthesizer_rewards(candidates, [source] * 2, [0.6, 0.3], ttcs.Args(skeleton_check=False))
    assert bell == pytest.approx([0.952194 - 1 / 2, (4 * 0.3 * 0.7) ** 1.2 - 1 / 2], abs=1e-6)


def test_majority_vote_ties_go_to_the_answer_voted_first_and_none_does_not_vote():
    assert ttcs.majority_vote(["3", "5", "5", "3", "7"]) == ("3", 0.4)  # 3 and 5 tie: 3 was voted first
    assert ttcs.majority_vote([None, None, "4", None]) == ("4", 0.25)  # None never wins, but counts in the share
    assert ttcs.majority_vote([None, None]) == (None, 0.0)
    assert ttcs.pseudo_rewards(["3", "5", None, "3"], "3") == [1.0, 0.0, 0.0, 1.0]
    assert ttcs.pseudo_rewards([None, None], None) == [0.0, 0.0]


def test_agreement_band_is_inclusive():
    assert ttcs.agreement_mask([0.2, 0.25, 0.5, 0.75, 0.8, 1.0], 0.25, 0.75) == [False, True, True, True, False, False]


def test_judge_share_counts_unanswered_samples_and_a_none_majority_scores_zero():
    assert ttcs.judge_share(["1", "1", "2", None]) == 0.5
    assert ttcs.judge_share([None, None, "1"]) == 0.0
    assert ttcs.judge_share(["1"] * 10) == 1.0


def test_parse_question_takes_the_last_tagged_question():
    assert ttcs.parse_question("<question>1+2=</question> then <question> 3*4= </question>") == "3*4="
    assert ttcs.parse_question("no tags") is None and ttcs.parse_question("<question> </question>") is None
    assert ttcs.parse_question("<question>1+2=") is None


def test_similarity_flags_copies_with_length_dependent_thresholds():
    assert ttcs.too_similar("12+7*3=", "12+7*3=") == (True, 1.0)
    flagged, score = ttcs.too_similar("13+6*3=", "12+7*3=", skeleton_check=False)
    assert not flagged and score == pytest.approx(10 / 14)  # 5 matching characters of 7 + 7
    assert ttcs.too_similar("1+2", "1+2") == (False, 0.0)  # under 5 characters: never flagged
    long_a = "Find the number of ordered pairs of positive integers whose product is 360 and whose sum is even."
    long_b = long_a.replace("360", "720")
    assert ttcs.too_similar(long_b, long_a)[0]  # 98% identical, threshold 0.88 under 100 characters
    # the math skeleton: same formula with new numbers and a reworded sentence is still a copy
    a = "Compute the value of $3x^2 + 5x - 7$ when $x = 2$ for the lesson."
    b = "Evaluate the value of $4x^2 + 9x - 1$ when $x = 6$ for our lesson."
    assert ttcs.too_similar(b, a, skeleton_check=True)[0] and not ttcs.too_similar(b, a, skeleton_check=False)[0]


def test_sentence_bleu_and_near_duplicate_clusters():
    assert ttcs.sentence_bleu("a b c d".split(), "a b c d".split()) == pytest.approx(1.0)
    # no shared n-gram at all: every precision is ε/count → tiny but positive (NLTK's method 1 smoothing)
    assert 0 < ttcs.sentence_bleu("a b c d".split(), "w x y z".split()) < 0.2
    assert ttcs.cluster_sizes(["a b c d", "a b c d", "w x y z"]) == [2, 2, 1]
    assert ttcs.cluster_sizes(["12+7*3=", "12+7*3=", "5-4="], tokens="chars") == [2, 2, 1]
    assert ttcs.cluster_sizes(["a b c d"] * 3 + [""]) == [3, 3, 3, 1]


def test_synthesizer_rewards_golden_batch():
    args = ttcs.Args(skeleton_check=False)
    source = "the source question is this one"
    candidates = [None, "p q r s t", "p q r s t", "a completely different problem here", source]
    shares = [0.0, 0.5, 0.6, 0.5, 0.5]
    rewards, stats = ttcs.synthesizer_rewards(candidates, [source] * 5, shares, args)
    assert rewards[0] == 0.0  # nothing parsed
    assert rewards[1] == pytest.approx(1.0 - 2 / 5)  # s = ½, a duplicate pair: penalty 2/5
    assert rewards[2] == pytest.approx(0.952194 - 2 / 5, abs=1e-6)
    assert rewards[3] == pytest.approx(1.0 - 1 / 5)
    assert rewards[4] == 0.0  # a copy of its source: × (1 − 1.0)
    assert stats["valid_rate"] == pytest.approx(0.8) and stats["too_similar"] == pytest.approx(0.25)


# -------------------------------------------------------------------------------------------- the stage


def _weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def test_no_ground_truth_enters_the_loop(tmp_path):
    """Shuffling (or dropping) the answers of the test questions changes nothing the stage trains on."""
    data = write_addition_data(tmp_path / "d")
    rows = [json.loads(l) for l in (data / "test.jsonl").read_text().splitlines()]
    answers = [r["answer"] for r in rows]
    random.Random(1).shuffle(answers)
    (data / "shuffled.jsonl").write_text("".join(json.dumps({**r, "answer": a}) + "\n" for r, a in zip(rows, answers)))
    finals = {}
    for name in ("test", "shuffled"):
        run_dir = tmp_path / name
        r = _ttcs_recipe(data, data / f"{name}.jsonl", label_column="answer")
        pipeline.run(load_recipe(write_recipe(tmp_path, r, f"{name}.yaml")), run_dir=run_dir)
        finals[name] = run_dir / "ttcs" / "final"
        records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"ttcs"' in l]
        for key in ("synthesizer/reward", "synthesizer/valid_rate", "solver/reward", "solver/agreement",
                    "solver/kept_groups", "solver/agreement_hist/band", "ttcs/pseudo_label_accuracy",
                    "solver/loss", "synthesizer/loss"):
            assert key in records[-1], key
    for part in (Path("."), Path("synthesizer")):
        a, b = _weights(finals["test"] / part), _weights(finals["shuffled"] / part)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (part, k)
    # and the weights did move: both policies trained
    init = _weights(tmp_path / "test" / "sft" / "final")
    for part in (Path("."), Path("synthesizer")):
        moved = _weights(finals["test"] / part)
        assert any(not torch.equal(moved[k], init[k]) for k in init if k in moved), part


@pytest.mark.parametrize("solver_steps", [1, 2])
def test_both_policies_checkpoint_and_resume_exactly(tmp_path, solver_steps):
    """Also with several solver steps per iteration: the solver's step count and batches resume with it."""
    data = write_addition_data(tmp_path / "d")
    r = _ttcs_recipe(data, data / "test.jsonl", steps=4, save_every=2, solver_steps=solver_steps)
    path = write_recipe(tmp_path, r)
    full = tmp_path / "full"
    pipeline.run(load_recipe(path), run_dir=full)
    ckpt = full / "ttcs" / "checkpoint-2"
    assert (ckpt / "synthesizer" / "model.safetensors").is_file()
    assert {p.name for p in (ckpt / "learner").iterdir()} >= {"model.safetensors", "model_1.safetensors",
                                                            "optimizer.bin", "optimizer_1.bin"}
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "ttcs" / "final")  # as if the run had died after checkpoint-2
    metrics = resumed / "metrics.jsonl"
    metrics.write_text("".join(l + "\n" for l in metrics.read_text().splitlines()
                               if not ('"ttcs"' in l and json.loads(l)["step"] > 2)))
    pipeline.run(load_recipe(path), run_dir=resumed, resume=True)
    for part in (Path("."), Path("synthesizer")):
        a, b = _weights(full / "ttcs" / "final" / part), _weights(resumed / "ttcs" / "final" / part)
        for k in a:
            assert torch.equal(a[k], b[k]), (part, k)


def test_ttcs_recipes_validate(tmp_path):
    for name in ("ttcs/aime24_qwen2.5_math_7b.yaml", "ttcs/math500_qwen2.5_math_7b.yaml", "quickstart/ttcs.yaml"):
        stage = next(s for s in load_recipe(REPO / "recipes" / name).stages if s.kind == "ttcs")
        synth_train, synth_args = stage.synthesizer
        assert stage.algo.agreement_low == 0.25 and stage.algo.agreement_high == 0.75
        assert synth_train.group_size >= 2 and "{question}" in stage.spec.synthesizer.template


def test_ttcs_recipe_errors_name_the_key(tmp_path):
    from posttrain.errors import UserError

    data = write_addition_data(tmp_path / "d")
    r = _ttcs_recipe(data, data / "test.jsonl")
    r["stages"]["ttcs"]["rewards"] = [{"name": "exact"}]
    with pytest.raises(UserError, match="stages.ttcs.rewards: a `ttcs` stage reads no rewards"):
        load_recipe(write_recipe(tmp_path, r))
    del r["stages"]["ttcs"]["rewards"]
    r["stages"]["ttcs"]["synthesizer"]["args"]["group_sise"] = 4
    with pytest.raises(UserError, match=r"stages.ttcs.synthesizer.args.group_sise.*group_size"):
        load_recipe(write_recipe(tmp_path, r))


@pytest.mark.parametrize("name", ["ttcs/aime24_qwen2.5_math_7b.yaml", "ttcs/math500_qwen2.5_math_7b.yaml",
                                  "quickstart/ttcs.yaml"])
def test_shipped_ttcs_recipes_run_two_steps_on_a_tiny_model(tmp_path, name):
    data = write_addition_data(tmp_path / "d")
    small = {"steps": 2, "prompts_per_step": 4, "group_size": 2, "batch_size": 8, "micro_batch_size": 4,
             "max_tokens": 6, "kl_coef": 0.0}
    overrides = tiny_overrides(data, "ttcs", quickstart=name.startswith("quickstart")) + [
        f"stages.ttcs.data.path={data}/test.jsonl", "stages.ttcs.synthesizer.template={question}?",
        *(f"stages.ttcs.synthesizer.args.{k}={v}" for k, v in small.items()),
        *(f"stages.ttcs.args.{k}={v}" for k, v in {**small, "synthetic_per_step": 2, "judge_samples": 2,
                                                   "group_size": 4, "label_column": "answer"}.items()),
    ]
    run_dir = run_two_steps(REPO / "recipes" / name, overrides, tmp_path / "run", "ttcs")
    assert (run_dir / "ttcs" / "final" / "synthesizer" / "model.safetensors").is_file()
