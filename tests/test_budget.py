"""The budget planner (`quant-noise plan`): sizes, the knapsack, sensitivities, the planned YAML, and the CLI on a real LM."""
import itertools
import random
import re

import pytest
import torch
from torch import nn

from conftest import TINY_LM, run, train_lm
from quant_noise_plugin.budget import (
    BudgetError, Choice, Plan, Setting, WeightMenu, _carry_rises, allocate, measure_menus, parse_size, schedule_text,
    setting_bytes, weight_menus,
)
from quant_noise_plugin.schedule import load_schedule, plan_schedule
from test_schedule import TinyLM


def menu(name, options, rise_scale=1.0):
    """A synthetic menu: options (bytes, error); the rise measured at the first option is ``rise_scale`` x its error."""
    choices = [Choice(Setting(8, 2 ** (i + 2)), b, e) for i, (b, e) in enumerate(options)]
    out = WeightMenu([name], "Linear", [16, 16], choices, choices[0].setting)
    out.measured_rise = rise_scale * choices[0].error
    return out


def test_parse_size_reads_the_units_users_write():
    assert [parse_size(t) for t in ("200KB", "0.2MB", "1.5MiB", "200000", "64 kib", "2mb")] == [200000, 200000, 1572864, 200000, 65536, 2000000]
    with pytest.raises(BudgetError, match="--target-size 2 bananas: a size such as"):
        parse_size("2 bananas")


def test_setting_bytes_count_codes_centroids_and_scales_as_the_packed_file_does():
    # 512 x 128 at block 8, K 16: 8192 codes of 4 bits, 16 x 8 int8 centroids + one scale and zero point, the fitted flag
    assert setting_bytes([512, 128], Setting(8, 16), 8) == 8192 * 4 // 8 + 16 * 8 + 8 + 1
    assert setting_bytes([512, 128], Setting(8, 16), None) == 8192 * 4 // 8 + 16 * 8 * 2 + 1  # fp16 centroids
    assert setting_bytes([512, 128], Setting(), 8) == 512 * 128 + 512 * 8 + 1  # int8 codes, per-row scale and zero point
    assert setting_bytes([512, 128], Setting(), None) == 512 * 128 * 2


def test_knapsack_fits_the_budget_and_finds_the_optimum():
    rng = random.Random(0)
    for trial in range(30):
        menus = [menu(f"w{i}", [(rng.randint(10, 100), 0.0) for _ in range(rng.randint(2, 5))]) for i in range(rng.randint(2, 4))]
        for m in menus:
            for c in m.choices:
                c.rise = rng.random()
        combos = list(itertools.product(*[m.choices for m in menus]))
        for budget in (60, 150, 250):
            picks = allocate(menus, budget)
            feasible = [sum(c.rise for c in combo) for combo in combos if sum(c.bytes for c in combo) <= budget]
            if not feasible:
                assert picks is None
                continue
            chosen = [m.choices[i] for m, i in zip(menus, picks)]
            assert sum(c.bytes for c in chosen) <= budget
            # optimal up to the bucket rounding (a fraction of a byte per weight here)
            margin = [sum(c.rise for c in combo) for combo in combos if sum(c.bytes for c in combo) <= budget - len(menus)]
            assert min(feasible) - 1e-9 <= sum(c.rise for c in chosen) <= (min(margin) if margin else float("inf")) + 1e-6


def test_a_more_sensitive_weight_gets_at_least_the_bytes_of_a_less_sensitive_one_of_the_same_size():
    options = [(40, 8.0), (60, 4.0), (90, 2.0), (140, 1.0), (220, 0.5)]  # bytes, error: the same weight shape and errors
    strictly = False
    for budget in range(80, 460, 10):
        sensitive, calm = menu("sensitive", options, rise_scale=1.0), menu("calm", options, rise_scale=0.1)
        _carry_rises([sensitive, calm])
        picks = allocate([sensitive, calm], budget)
        mine, theirs = sensitive.choices[picks[0]].bytes, calm.choices[picks[1]].bytes
        assert mine >= theirs, budget
        strictly |= mine > theirs
    assert strictly  # and the difference shows somewhere: the sensitivities are read


class Regression(nn.Module):
    """Two Linears trained to fit a random target: a loss that rises as its weights are quantized."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def fitted_regression():
    """A Regression model, batches of targets it fits up to noise (any change of its weights raises the loss), and the
    squared error of a batch as the planner's ``run`` returns it."""
    model = Regression()
    with torch.no_grad():
        batches = [(x, model(x) + 0.01 * torch.randn(64, 8)) for x in (torch.randn(64, 16) for _ in range(3))]
    run_batch = lambda b: (((model(b[0]) - b[1]) ** 2).sum(), b[0].shape[0])  # noqa: E731
    return model, batches, run_batch


def test_measured_rises_restore_the_weights_and_anchor_the_proxy():
    model, batches, run_batch = fitted_regression()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    menus = weight_menus(model, 8, block_sizes=(4, 8), centroid_counts=(4, 16))
    measured = weight_menus(model, 8, block_sizes=(4, 8), centroid_counts=(4, 16))
    base = measure_menus(model, menus, batches, run_batch, 8, reference_bits=1.0)
    measure_menus(model, measured, batches, run_batch, 8, reference_bits=1.0, measure_all=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert base == pytest.approx(sum(float(run_batch(b)[0]) for b in batches) / 192)
    for proxy, exact in zip(menus, measured):
        anchor = next(c for c in proxy.choices if c.setting == proxy.reference)
        assert anchor.rise == pytest.approx(proxy.measured_rise)  # at its reference the proxy is the measurement
        assert proxy.reference == Setting(8, 4) or proxy.reference == Setting(4, 16)  # 0.25 or 1.0 bits per weight
        by_setting = {c.setting: c for c in exact.choices}
        assert by_setting[Setting()].rise == pytest.approx(0, abs=1e-3 * max(abs(c.rise) for c in exact.choices))  # int8
        coarse, fine = by_setting[Setting(8, 4)], by_setting[Setting(4, 16)]
        assert coarse.rise > fine.rise > 0 and coarse.error > fine.error


def tiny_plan(picks):
    model = TinyLM()
    menus = weight_menus(model, 8, block_sizes=(4, 8), centroid_counts=(4, 16))
    chosen = [next(c for c in m.choices if c.setting == picks.get(m.name, Setting(4, 16))) for m in menus]
    return model, Plan(menus, chosen, 10_000, 9_950, 8, 3.0, 4)


def test_the_planned_yaml_loads_through_the_schedules_validation_and_gives_each_layer_its_setting(tmp_path):
    left_out = {"decoder.layers.1.fc2": Setting(), "decoder.layers.0.self_attn.k_proj": Setting()}
    own = {"decoder.layers.0.fc1": Setting(8, 4), "decoder.embed_tokens": Setting(8, 16)}
    model, plan = tiny_plan({**left_out, **own})
    text = schedule_text(plan, model, updates=10, objective="activations")
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    schedule = load_schedule(path)  # the hand-written schedules' own loader
    assert schedule.final_scalar_bits == 8 and schedule.objective == "activations" and schedule.total_updates == 10
    layers = {p.name: (p.block_size, p.n_centroids) for stage in plan_schedule(schedule, model) for p in stage.layers}
    assert set(layers) == {m.name for m in plan.menus} - set(left_out)
    assert layers["decoder.layers.0.fc1"] == (8, 4) and layers["decoder.embed_tokens"] == (8, 16)
    assert layers["decoder.layers.1.fc1"] == (4, 16)
    assert [s.name for s in schedule.stages] == ["embeddings", "ffn", "attention"]
    # a layer left out of one family lists its siblings by name instead of the family's regex
    assert "decoder\\.layers\\.\\d+\\.fc1" in text and "decoder\\.layers\\.0\\.fc2" in text
    assert "# Left out of PQ (int8 codes at pack" in text and "decoder.layers.1.fc2 (16x32): int8" in text


def test_a_yaml_that_would_misplace_a_layer_is_caught_before_it_is_written():
    from quant_noise_plugin.budget import check_schedule_text

    model, plan = tiny_plan({"decoder.layers.1.fc2": Setting()})
    text = schedule_text(plan, model)
    check_schedule_text(text, plan, model)
    stage = re.search(r"    layers: '[^']*fc[^']*'", text).group(0)
    broad = text.replace(stage, "    layers: 'decoder\\.layers\\.\\d+\\.fc[12]'")  # would quantize the layer left out
    with pytest.raises(AssertionError, match="does not give layer decoder.layers.1.fc2 its planned setting"):
        check_schedule_text(broad, plan, model)


# -- the CLI on a real fairseq LM ----------------------------------------------------------------


def planned_bytes(text):
    header = re.search(r"a packed file of ([\d,]+) bytes predicted for a target of ([\d,]+)", text)
    return int(header.group(1).replace(",", "")), int(header.group(2).replace(",", ""))


def test_plan_lands_on_the_budget(lm_data, dense_lm, tmp_path):
    plan = tmp_path / "plan.yaml"
    out = run(["quant-noise", "plan", dense_lm, "--target-size", "60KB", "--calibrate", lm_data, "--calibration-batches", "2",
               "--updates", "4", "-o", plan]).output
    assert "weights in PQ" in out
    predicted, target = planned_bytes(plan.read_text())
    assert target == 60000 and 0.99 * target <= predicted <= target
    schedule = load_schedule(plan)
    assert schedule.total_updates == 4 and schedule.objective == "output" and schedule.final_scalar_bits == 8


def test_the_ipq_task_plans_for_a_target_runs_it_and_a_resumed_run_keeps_the_plan(lm_data, dense_lm, tmp_path):
    save = tmp_path / "ipq"
    first = train_lm(lm_data, save, "--task", "ipq_language_modeling", "--ipq-target-size", "x12", "--finetune-from-model", dense_lm,
                     "--arch", "qn_transformer_lm", *TINY_LM, "--lr", "0.0005", "--ipq-calibration-batches", "2", max_update=4).output
    assert "ipq: --ipq-target-size x12: planned" in first
    planned = save / "ipq_plan.yaml"
    predicted, target = planned_bytes(planned.read_text())
    assert load_schedule(planned).total_updates == 4
    packed = tmp_path / "packed.pt"
    run(["quant-noise", "pack", save / "checkpoint_last.pt", packed])  # final_scalar_bits 8 from the plan
    assert abs(packed.stat().st_size - target) <= 0.02 * target, (packed.stat().st_size, target)
    text = planned.read_text()
    resumed = train_lm(lm_data, save, "--task", "ipq_language_modeling", "--ipq-target-size", "x12", "--finetune-from-model", dense_lm,
                       "--arch", "qn_transformer_lm", *TINY_LM, "--lr", "0.0005", max_update=5).output
    assert "the plan of the first run" in resumed and planned.read_text() == text


@pytest.mark.parametrize("flag, value", [("--target-size", "1KB"), ("--target-ratio", "1.5")])
def test_an_unreachable_budget_is_a_one_line_error_with_the_reachable_sizes(lm_data, dense_lm, tmp_path, flag, value):
    result = run(["quant-noise", "plan", dense_lm, flag, value, "--calibrate", lm_data, "-o", tmp_path / "plan.yaml"], check=False)
    assert result.returncode == 2
    line = result.output.strip().splitlines()[-1]
    assert re.fullmatch(r"quant-noise plan: error: target [\d.]+ MB is out of reach: this model's packed file can be [\d.]+ MB "
                        r"\(every weight at its coarsest setting\) to [\d.]+ MB \(int8, no PQ\)", line), line
    assert not (tmp_path / "plan.yaml").exists()


def test_fisher_sensitivity_estimates_the_measured_rises_in_one_backward_pass_per_batch():
    model, batches, run_batch = fitted_regression()
    fisher = weight_menus(model, 8, block_sizes=(4, 8), centroid_counts=(4, 16))
    measured = weight_menus(model, 8, block_sizes=(4, 8), centroid_counts=(4, 16))
    measure_menus(model, fisher, batches, run_batch, 8, sensitivity="fisher")
    measure_menus(model, measured, batches, run_batch, 8, measure_all=True)
    assert all(p.grad is None for p in model.parameters())  # the model's own gradients untouched
    estimated = [c.rise for m in fisher for c in m.choices]
    exact = [c.rise for m in measured for c in m.choices]
    assert all(r >= 0 for r in estimated) and max(estimated) > 0
    # the same order of settings as the measurement (rank correlation), the coarsest costing most
    rank = lambda v: torch.tensor(v).argsort().argsort().float()  # noqa: E731
    assert torch.corrcoef(torch.stack([rank(estimated), rank(exact)]))[0, 1] > 0.8
    with pytest.raises(BudgetError, match="--sensitivity hessian: use measured, fisher"):
        measure_menus(model, fisher, batches, run_batch, 8, sensitivity="hessian")


def test_the_fisher_proxy_fits_on_a_few_rows_and_codes_the_rest_by_their_weighted_nearest_centroid():
    from quant_noise_plugin.budget import fit_rows_for, quantized

    torch.manual_seed(0)
    weight = torch.randn(64, 16)
    importance = torch.rand(1, 16) ** 4 * 100  # far from uniform: an unweighted assignment picks other centroids
    approx = quantized(weight, Setting(4, 8), 8, importance, fit_rows=16)
    fitted = quantized(weight[:16], Setting(4, 8), 8, importance)
    assert torch.equal(approx[:16], fitted)  # the codebook is the one k-means fits on the first rows alone
    centroids = fitted.reshape(-1, 4).unique(dim=0)
    assert len(centroids) == 8
    blocks, weights = weight.reshape(-1, 4), importance.expand(64, 16).reshape(-1, 4)
    errors = (weights[:, None, :] * (blocks[:, None, :] - centroids[None]) ** 2).sum(-1)  # (blocks, centroids)
    chosen = ((approx.reshape(-1, 1, 4) == centroids[None]).all(-1)).float().argmax(1)
    assert torch.equal(chosen, errors.argmin(1))  # every held-out block by its importance-weighted nearest centroid
    assert not torch.equal(chosen, ((blocks[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1))
    assert torch.equal(quantized(weight, Setting(4, 8), 8, importance, fit_rows=64), quantized(weight, Setting(4, 8), 8, importance))
    # at least 2^16 weights, or 32 blocks per centroid, are fitted; scalar settings are not fitted at all
    assert fit_rows_for([20000, 1024], Setting(4, 256)) == 64 and fit_rows_for([20000, 1024], Setting(16, 256)) == 128
    assert fit_rows_for([20000, 1024], Setting()) is None


def test_a_plan_short_of_its_budget_says_when_the_menus_largest_k_stopped_it(monkeypatch):
    import quant_noise_plugin.planner.knapsack as budget

    monkeypatch.setattr(budget, "planned_file_bytes", lambda model, state, menus, picks, bits: 100 + sum(c.bytes for c in picks))
    menus = [menu("a", [(100, 9.0), (200, 4.0), (400, 1.0)]), menu("b", [(100, 8.0), (300, 2.0)])]
    _carry_rises(menus)
    plan = budget.plan_budget(None, {}, menus, 2000, 8, 0.0, 1, reach=(300, 800))
    assert [c.bytes for c in plan.picks] == [400, 300] and plan.predicted_file_bytes == 800
    assert len(plan.notes) == 1 and "uses 40.0% of the target" in plan.notes[0]
    assert "1 weight(s) at the menu's largest K (16, e.g. a): --centroids ... 32 64 offers more" in plan.notes[0]
    assert budget.plan_budget(None, {}, menus, 808, 8, 0.0, 1, reach=(300, 800)).notes == []  # within 1%: no note


def test_a_second_anchor_keeps_a_weight_whose_fine_setting_shows_no_rise_from_looking_free_when_coarse():
    """A model trained with noise can show no rise at the reference; one anchor then carries a floor to every
    setting, two anchors (the coarsest measured too) make the rise linear in the error between them."""
    seen = menu("seen", [(400, 1.0), (200, 2.0), (100, 4.0)], rise_scale=0.5)  # the reference's rise: 0.5
    flat = menu("flat", [(400, 1.0), (200, 2.0), (100, 4.0)], rise_scale=-0.01)  # no rise at the reference
    _carry_rises([seen, flat])
    floor = 1e-3 * 0.5
    assert [c.rise for c in flat.choices] == pytest.approx([floor, 2 * floor, 4 * floor])  # one anchor: the coarsest looks free
    flat.coarse, flat.coarse_rise = flat.choices[2].setting, 3.0
    _carry_rises([seen, flat])
    assert [c.rise for c in flat.choices] == pytest.approx([floor, floor + (3.0 - floor) / 3, 3.0])
    assert [c.rise for c in seen.choices] == pytest.approx([0.5, 1.0, 2.0])  # a weight without a second anchor: as before
    assert allocate([seen, flat], 610) == [1, 0]  # the budget goes where the measured rises say, not to the free-looking one


def test_by_default_each_weights_rise_is_measured_at_its_reference_and_its_coarsest_setting():
    """The default (--anchors 2): two measured rises per weight, each the one measuring every setting finds there."""
    model, batches, run_batch = fitted_regression()
    default = weight_menus(model, 8, block_sizes=(4, 8), centroid_counts=(4, 16))
    every = weight_menus(model, 8, block_sizes=(4, 8), centroid_counts=(4, 16))
    measure_menus(model, default, batches, run_batch, 8)
    measure_menus(model, every, batches, run_batch, 8, measure_all=True)
    for menu, all_measured in zip(default, every):
        coarsest = min((c for c in menu.choices if c.setting.is_pq), key=lambda c: (c.bytes, c.error))
        assert menu.coarse == coarsest.setting != menu.reference
        exact = {c.setting: c.rise for c in all_measured.choices}
        assert menu.coarse_rise == pytest.approx(exact[menu.coarse]) and menu.measured_rise == pytest.approx(exact[menu.reference])
