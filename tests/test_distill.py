"""π-Distill and OPSD: golden values, stop-gradient placement, response-span alignment, recipes and a smoke run."""

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import recipe_dict, run_two_steps, tiny_overrides, write_addition_data, write_recipe
from posttrain import pipeline
from posttrain.algorithms import distill, grpo
from posttrain.recipe import load_recipe
from posttrain.rollout.base import Completion
from posttrain.stages.distill import build_pair_rows, collate_pair, role_forward, teacher_prompt
from posttrain.stages.rl import Group, PromptSet

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ credit


def test_shaped_return_matches_the_hand_value():
    # ALGORITHMS.md: return 1.0, β = 0.1, summed token KL 2.0 → 0.8
    logp_s = torch.tensor([[-0.5, -1.0, -0.25]])
    logp_t = torch.tensor([[-1.5, -1.5, -0.75]])  # per-token logp_S − logp_T = 1.0, 0.5, 0.5 → Σ 2.0
    shaped = distill.shaped_returns(torch.tensor([1.0]), logp_s, logp_t, torch.ones(1, 3), beta=0.1)
    assert float(shaped) == pytest.approx(0.8)
    masked = distill.shaped_returns(torch.tensor([1.0]), logp_s, logp_t, torch.tensor([[1, 0, 0]]), beta=0.1)
    assert float(masked) == pytest.approx(0.9)  # padding tokens add no KL


def test_credit_puts_each_modes_kl_in_the_return_before_the_group_baseline():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0])
    logp_t = torch.tensor([[-1.0], [-1.0], [-1.0], [-1.0]])
    logp_s = torch.tensor([[-1.0], [-3.0], [-1.0], [-2.0]])
    mask = torch.ones(4, 1)
    adv = lambda r: grpo.group_advantages(torch.tensor(r, dtype=torch.float64), 4, grpo.Args()).float()
    opsd = distill.credit(rewards, 4, distill.Args(mode="opsd", beta=0.5), logp_teacher=logp_t, logp_student=logp_s, mask=mask)
    # OPSD: R − β Σ (logp_S − logp_T) = [1, 1 + 1, 0, 0 + 0.5]
    assert opsd["shaped_return"].tolist() == pytest.approx([1.0, 2.0, 0.0, 0.5])
    torch.testing.assert_close(opsd["adv"], adv([1.0, 2.0, 0.0, 0.5]))
    pi = distill.credit(rewards, 4, distill.Args(mode="pi_distill", beta=0.5), logp_teacher=logp_t, logp_student=logp_s, mask=mask)
    # π-Distill: the teacher's return R − β Σ (logp_T − logp_S) = [1, 1 − 1, 0, −0.5]; the student's is R
    assert pi["shaped_return"].tolist() == pytest.approx([1.0, 0.0, 0.0, -0.5])
    torch.testing.assert_close(pi["adv_teacher"], adv([1.0, 0.0, 0.0, -0.5]))
    torch.testing.assert_close(pi["adv"], adv([1.0, 1.0, 0.0, 0.0]))
    shared = distill.credit(rewards, 4, distill.Args(beta=0.5, student_advantage="teacher"), logp_teacher=logp_t,
                            logp_student=logp_s, mask=mask)
    torch.testing.assert_close(shared["adv"], shared["adv_teacher"])  # the official code's choice
    full = distill.credit(rewards, 4, distill.Args(mode="opsd", opsd_kl="full"), logp_teacher=logp_t, logp_student=logp_s, mask=mask)
    torch.testing.assert_close(full["adv"], adv([1.0, 1.0, 0.0, 0.0]))  # the KL is in the loss instead


# -------------------------------------------------------------------------------------------------- losses


def _leaves(*values):
    return [torch.tensor([[v]], dtype=torch.float64, requires_grad=True) for v in values]


def test_pi_distill_stop_gradients_and_values():
    beta, adv = 0.1, 1.0
    batch = {"mask": torch.ones(1, 1, dtype=torch.long), "adv": torch.tensor([adv]), "adv_teacher": torch.tensor([adv])}
    # teacher term only (α = 1): the student's log-prob gets no gradient; ∂L/∂logp_T = −A (on-policy ρ_T = 1)
    logp_t, logp_s = _leaves(math.log(0.5), math.log(0.45))
    out = distill.pi_distill_loss(logp_t, logp_s, batch, distill.Args(alpha=1.0, beta=beta))
    out.loss.sum().backward()
    assert out.loss.item() == pytest.approx(-adv)
    assert float(logp_t.grad) == pytest.approx(-adv) and (logp_s.grad is None or float(logp_s.grad) == 0.0)
    # student term only (α = 0): the teacher's log-prob is a constant (sg π_T in the ratio and in the KL)
    logp_t, logp_s = _leaves(math.log(0.5), math.log(0.45))
    out = distill.pi_distill_loss(logp_t, logp_s, batch, distill.Args(alpha=0.0, beta=beta))
    out.loss.sum().backward()
    rho = 0.9  # π_S / π_T inside the clip range [0.8, 1.2]
    assert out.loss.item() == pytest.approx(-adv * rho + beta * (math.log(0.5) - math.log(0.45)))
    assert float(logp_s.grad) == pytest.approx(-adv * rho - beta)
    assert logp_t.grad is None or float(logp_t.grad) == 0.0
    # ρ_S = 1.3 > 1 + ε with A > 0: the clipped branch, so only the KL term's gradient −β is left
    logp_t, logp_s = _leaves(math.log(0.5), math.log(0.65))
    out = distill.pi_distill_loss(logp_t, logp_s, batch, distill.Args(alpha=0.0, beta=beta))
    out.loss.sum().backward()
    assert out.loss.item() == pytest.approx(-1.2 * adv + beta * (math.log(0.5) - math.log(0.65)))
    assert float(logp_s.grad) == pytest.approx(-beta)
    # the mix: α·L_T + (1 − α)·L_S
    logp_t, logp_s = _leaves(math.log(0.5), math.log(0.45))
    out = distill.pi_distill_loss(logp_t, logp_s, batch, distill.Args(alpha=0.5, beta=beta))
    expected = 0.5 * -adv + 0.5 * (-adv * rho + beta * (math.log(0.5) - math.log(0.45)))
    assert out.loss.item() == pytest.approx(expected)


def test_opsd_reward_mode_is_a_plain_policy_gradient_on_the_student():
    logp_s = torch.tensor([[-0.7, -0.2]], requires_grad=True)
    batch = {"mask": torch.tensor([[1, 1]]), "adv": torch.tensor([0.5]), "logp_teacher": torch.tensor([[-1.0, -1.0]])}
    out = distill.opsd_loss(logp_s, batch, distill.Args(mode="opsd"))
    out.loss.sum().backward()
    assert logp_s.grad.tolist() == [[-0.5, -0.5]]
    assert float(out.metrics["kl_student_teacher"]) == pytest.approx(0.3 + 0.8)


def test_full_vocabulary_reverse_kl_value_and_gradient_reach_only_the_student():
    s = torch.tensor([[[math.log(0.75), math.log(0.25)]]], requires_grad=True)
    t = torch.tensor([[[math.log(0.5), math.log(0.5)]]], requires_grad=True)
    kl = distill.full_reverse_kl(s, t)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl.item() == pytest.approx(expected, rel=1e-6)
    kl.sum().backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    same = distill.full_reverse_kl(t.detach(), t.detach())
    assert float(same) == pytest.approx(0.0, abs=1e-7)


def test_a_sampled_k1_loss_term_has_no_expected_gradient_which_is_why_opsd_does_not_use_one():
    # E_{y~π}[∇ log π(y)] = 0: over a 3-way softmax the exact expectation of the k1 term's gradient vanishes,
    # while the full reverse KL to a different teacher has a non-zero gradient
    z = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    p = torch.softmax(z, -1)
    teacher = torch.log_softmax(torch.tensor([1.0, 0.0, -1.0]), -1)
    k1_expected = sum(p[i].detach() * (torch.log_softmax(z, -1)[i] - teacher[i]) for i in range(3))
    (grad_k1,) = torch.autograd.grad(k1_expected, z)
    assert grad_k1.abs().max() < 1e-6
    (grad_kl,) = torch.autograd.grad(distill.full_reverse_kl(z.view(1, 1, 3), teacher.view(1, 1, 3)).sum(), z)
    assert grad_kl.abs().max() > 1e-2


# --------------------------------------------------------------------------------------------- alignment


def test_response_logprobs_align_the_same_tokens_under_prompts_of_different_lengths(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    prompts = {"student": PromptSet([[5, 6], [7, 8, 9]], ["", ""], {}),
               "teacher": PromptSet([[11, 12, 13, 14, 5, 6], [15, 7, 8, 9]], ["", ""], {})}
    c = lambda ids: Completion(prompt_index=0, token_ids=ids, text="", logprobs=None, finish_reason="stop")
    groups = [Group(0, [c([20, 21, 2]), c([22, 2])], [1.0, 0.0], {}), Group(1, [c([23, 24, 25, 26])], [0.0], {})]
    rows = build_pair_rows(groups, [True, True], prompts)
    batch = collate_pair(rows, pad_id=0)
    assert batch["mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    with torch.no_grad():
        for role in ("student", "teacher"):
            logp = role_forward(model, batch, role, temperature=1.0)
            for i, row in enumerate(rows):
                ids = torch.tensor([row["ids"][role]])
                logits = model(input_ids=ids).logits[0]
                start, n = row["start"][role], row["length"]
                want = torch.log_softmax(logits[start - 1 : start - 1 + n], -1).gather(
                    -1, ids[0, start : start + n].unsqueeze(-1)).squeeze(-1)
                torch.testing.assert_close(logp[i, :n], want, rtol=1e-5, atol=1e-5)


def test_teacher_prompt_fills_the_template():
    assert teacher_prompt("{privileged};{prompt}", "2+3=", "2+3=5") == "2+3=5;2+3="


# -------------------------------------------------------------------------------------------- recipes


def test_distill_recipes_validate_and_name_their_settings():
    for name in ("distill/pi_distill_math.yaml", "distill/opsd_math.yaml", "quickstart/distill.yaml", "quickstart/opsd.yaml"):
        resolved = load_recipe(REPO / "recipes" / name)
        stage = next(s for s in resolved.stages if s.kind == "distill")
        assert stage.spec.privileged is not None and stage.algo.mode in ("pi_distill", "opsd")


def test_a_distill_stage_without_its_privileged_column_is_an_error(tmp_path):
    from posttrain.errors import UserError

    data = write_addition_data(tmp_path / "d")
    r = recipe_dict(data)
    r["stages"] = {"distill": {"data": {"path": f"{data}/train.jsonl", "template": "plain"},
                               "rewards": [{"name": "exact"}], "args": {"steps": 1}}}
    with pytest.raises(UserError, match=r"stages.distill.privileged: a `distill` stage needs `privileged:`"):
        load_recipe(write_recipe(tmp_path, r))
    r["stages"]["distill"]["privileged"] = {"column": "answer", "template": "{prompt} no placeholder"}
    with pytest.raises(UserError, match=r"stages.distill.privileged: .*template must contain \{privileged\}"):
        load_recipe(write_recipe(tmp_path, r))


@pytest.mark.parametrize("mode,kl", [("pi_distill", "reward"), ("opsd", "reward"), ("opsd", "full")])
def test_distill_stage_runs_two_steps(tmp_path, mode, kl):
    data = write_addition_data(tmp_path / "d")
    rows = [json.loads(l) for l in (data / "train.jsonl").read_text().splitlines()]
    (data / "hinted.jsonl").write_text("".join(json.dumps({**r, "hint": r["answer"]}) + "\n" for r in rows))
    r = recipe_dict(data, steps=2)
    r["stages"]["distill"] = {
        "data": {"path": f"{data}/hinted.jsonl", "template": "plain", "max_length": 16},
        "privileged": {"column": "hint", "template": "{privileged}|{prompt}"},
        "rewards": [{"name": "exact"}],
        "args": {"mode": mode, "opsd_kl": kl, "steps": 2, "prompts_per_step": 4, "group_size": 4, "batch_size": 8,
                 "micro_batch_size": 4, "max_tokens": 5, "lr": 1e-3},
    }
    run_dir = tmp_path / "run"
    pipeline.run(load_recipe(write_recipe(tmp_path, r)), run_dir=run_dir)
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"distill"' in l]
    assert [x["step"] for x in records] == [1, 2]
    keys = {"pi_distill": ("loss_teacher", "loss_student", "student_ratio"), "opsd": ("pg_loss", "kl_student_teacher")}[mode]
    for key in keys + ("accuracy", "distill/teacher_minus_student_logp"):
        assert key in records[-1] and math.isfinite(records[-1][key]), key
    if mode == "pi_distill":  # two optimizer steps per RL step (16 rows, batch 8): the teacher ratio is off-policy
        assert records[-1]["student_ratio"] > 0
    assert (run_dir / "distill" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["distill/pi_distill_math.yaml", "distill/opsd_math.yaml", "quickstart/distill.yaml",
                                  "quickstart/opsd.yaml"])
def test_shipped_distill_recipes_run_two_steps_on_a_tiny_model(tmp_path, name):
    data = write_addition_data(tmp_path / "d")
    rows = [json.loads(l) for l in (data / "train.jsonl").read_text().splitlines()]
    (data / "hinted.jsonl").write_text("".join(json.dumps({**r, "solution": r["answer"]}) + "\n" for r in rows))
    small = {"steps": 2, "prompts_per_step": 4, "group_size": 4, "batch_size": 8, "micro_batch_size": 4, "max_tokens": 5}
    overrides = tiny_overrides(data, "distill", quickstart=name.startswith("quickstart")) + [
        f"stages.distill.data.path={data}/hinted.jsonl", "stages.distill.privileged.column=solution",
        "stages.distill.privileged.template={privileged};{prompt}", "stages.distill.rewards=[{name: exact}]",
        *(f"stages.distill.args.{k}={v}" for k, v in small.items()),
    ]
    run_dir = run_two_steps(REPO / "recipes" / name, overrides, tmp_path / "run", "distill")
    assert (run_dir / "distill" / "final" / "model.safetensors").is_file()


def test_chunked_reverse_kl_equals_the_full_distribution_kl_and_its_student_gradient():
    from posttrain.algorithms.ops import chunked_reverse_kl

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 70, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(70, 16, generator=g))
    student = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    teacher = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    mask = torch.rand(3, 7, generator=g) > 0.3
    for chunk in (1, 4, None):
        kl = chunked_reverse_kl(student, teacher, head, mask, temperature=0.8, chunk=chunk)
        full = distill.full_reverse_kl(head(student), head(teacher), 0.8)
        torch.testing.assert_close(kl, full * mask, rtol=1e-6, atol=1e-6)
        weights = torch.randn(mask.shape, generator=g)
        (kl * weights).sum().backward()
        chunked_grads = student.grad.clone(), head.weight.grad.clone()
        assert teacher.grad is None  # the teacher is a constant of the KL
        student.grad = head.weight.grad = None
        (full * mask * weights).sum().backward()
        torch.testing.assert_close(chunked_grads[0], student.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(chunked_grads[1], head.weight.grad, rtol=1e-5, atol=1e-5)
        student.grad = head.weight.grad = None


@pytest.mark.parametrize("mode, kl", [("pi_distill", "reward"), ("opsd", "reward"), ("opsd", "full")])
def test_distill_losses_without_the_full_logits_equal_the_full_computation(tiny_lm_dir, monkeypatch, mode, kl):
    """Above `FULL_LOGITS_BUDGET` (forced here) each role's forward stops at the final hidden states of the
    response positions and the head runs in chunks: the loss and every gradient are unchanged (fp32)."""
    from transformers import AutoModelForCausalLM

    from posttrain import learner
    from posttrain.stages import distill as stage

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    prompts = {"student": PromptSet([[5, 6], [7, 8, 9]], ["", ""], {}),
               "teacher": PromptSet([[11, 12, 13, 14, 5, 6], [15, 7, 8, 9]], ["", ""], {})}
    c = lambda ids: Completion(prompt_index=0, token_ids=ids, text="", logprobs=None, finish_reason="stop")
    groups = [Group(0, [c([20, 21, 2]), c([22, 2])], [1.0, 0.0], {}), Group(1, [c([23, 24, 25, 26])], [0.0], {})]
    batch = collate_pair(build_pair_rows(groups, [True, False], prompts), pad_id=0)
    batch["adv"], batch["adv_teacher"] = torch.tensor([0.5, -0.5, 1.0]), torch.tensor([1.0, -1.0, 0.3])
    args = distill.Args(mode=mode, opsd_kl=kl, beta=0.3)
    results = []
    for budget in (learner.FULL_LOGITS_BUDGET, 0):
        monkeypatch.setattr(learner, "FULL_LOGITS_BUDGET", budget)
        model.zero_grad()
        out = stage.distill_loss(model, batch, args, temperature=0.9)
        total = (out.loss * out.mask).sum()
        total.backward()
        results.append((total.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-4, atol=1e-6, msg=name)
