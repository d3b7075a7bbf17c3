"""A plan written as a schedule YAML in today's format, with per-layer settings and comments saying why, read back
through the schedule's own validation."""
from __future__ import annotations

import re
from typing import Dict, List

from torch import nn

from ..schedule import plan_schedule, schedule_from_dict
from .knapsack import Plan
from .menus import BudgetError, Choice, WeightMenu

STAGE_ORDER = ("embeddings", "ffn", "attention", "other")


def _family(name: str) -> str:
    """The regex of a layer and its siblings in the other blocks: decoder.layers.3.fc1 -> decoder\\.layers\\.\\d+\\.fc1."""
    return re.sub(r"\\\.\d+\\\.", lambda m: r"\.\d+\.", re.escape(name))


def _stage_of(menu: WeightMenu) -> str:
    leaf = menu.name.rsplit(".", 1)[-1]
    if menu.kind == "Embedding":
        return "embeddings"
    if re.fullmatch(r"fc\d+", leaf):
        return "ffn"
    return "attention" if "attn" in menu.name else "other"


def schedule_text(plan: Plan, model: nn.Module, updates: int = 500, objective: str = "output", kmeans_iterations: int = 20,
                  title: str = "") -> str:
    """The plan as a schedule YAML in today's format, with per-layer settings and comments saying why; it is read
    back through the schedule's own validation and checked to give every weight its planned setting."""
    bits = plan.scalar_bits
    by_stage: Dict[str, List[tuple]] = {}
    left_out = []
    for menu, choice in zip(plan.menus, plan.picks):
        (by_stage.setdefault(_stage_of(menu), []) if choice.setting.is_pq else left_out).append((menu, choice))
    stages = [s for s in STAGE_ORDER if s in by_stage]
    if not stages:
        raise BudgetError(f"target {plan.target_bytes / 1e6:.4f} MB: every weight is best left out of PQ at this size; "
                          f"pack with `quant-noise pack --scalar-bits {bits or 8}` instead of running iPQ")
    families: Dict[str, set] = {}
    for menu in plan.menus:
        families.setdefault(_family(menu.name), set()).add(menu.name)

    def why(menu: WeightMenu, choice: Choice) -> str:
        return (f"#   {menu.name} ({'x'.join(map(str, menu.shape))}): {choice.setting.label(bits)}, "
                f"{choice.setting.bits_per_weight(bits):.2f} bits/w, {choice.bytes:,} B, est. loss rise {choice.rise:+.5f}; "
                f"measured {menu.measured_rise:+.5f} at {menu.reference.label(bits)}"
                + (f" and {menu.coarse_rise:+.5f} at {menu.coarse.label(bits)}" if menu.coarse and menu.coarse != menu.reference else ""))

    lines = [f"# {title or 'Planned by quant-noise plan'}: a packed file of {plan.predicted_file_bytes:,} bytes predicted "
             f"for a target of {plan.target_bytes:,} ({plan.predicted_file_bytes / plan.target_bytes:.2%})."]
    lines.append(f"# Calibration loss {plan.base_loss:.4f} nats per token over {plan.n_batches} training batches; the picks' "
                 f"summed estimated rise {plan.estimated_rise:+.4f} (each weight alone, before finetuning).")
    if any(m.coarse for m in plan.menus):
        lines.append("# A weight's rise is measured at two settings (the reference and its coarsest) and carried to the others")
        lines.append("# linearly in their activation-weighted error between them;")
    else:
        lines.append("# A weight's rise is measured at one setting and carried to the others by their activation-weighted error;")
    lines.append("# edit freely: `quant-noise schedule CKPT THIS.yaml` checks it, the iPQ task runs it.")
    lines += [f"# {note}" for note in plan.notes]
    lines += [f"# {line}" for line in plan.depth_lines]
    if left_out:
        lines.append(f"# Left out of PQ ({'int' + str(bits) + ' codes at pack, final_scalar_bits' if bits else 'fp16'}):")
        lines += [why(m, c) for m, c in left_out]
    lines += ["defaults:", "  Linear: {block_size: 8, n_centroids: 256}", "  Embedding: {block_size: 8, n_centroids: 256}",
              f"final_scalar_bits: {bits if bits else 'null'}", f"kmeans_iterations: {kmeans_iterations}",
              f"objective: {objective}", "seed: 0"]
    if plan.pruned is not None and plan.pruned.prunes:
        kept = ", ".join(map(str, plan.pruned.kept))
        lines.append(f"pruned: {{stack: {plan.pruned.stack}, kept: [{kept}], of: {plan.pruned.of}}}")
    lines.append("stages:")
    per_stage = [updates // len(stages) + (i < updates % len(stages)) for i in range(len(stages))]
    for stage, stage_updates in zip(stages, per_stage):
        members = by_stage[stage]
        names = {m.name for m, _ in members}
        parts = []
        for menu, _ in members:
            family = _family(menu.name)
            part = family if families[family] <= names else re.escape(menu.name)
            if part not in parts:
                parts.append(part)
        lines.append(f"  - name: {stage}")
        lines += ["  " + why(m, c) for m, c in members]
        lines.append(f"    layers: '{'|'.join(parts)}'")
        lines.append(f"    updates: {max(1, stage_updates)}")
        common = {}
        for kind in ("Linear", "Embedding"):
            settings = [c.setting for m, c in members if m.kind == kind]
            if settings:
                common[kind] = max(set(settings), key=lambda s: (settings.count(s), s.bits_per_weight(None)))
        if common:
            lines.append("    block_size: {" + ", ".join(f"{k}: {s.block_size}" for k, s in common.items()) + "}")
            lines.append("    n_centroids: {" + ", ".join(f"{k}: {s.n_centroids}" for k, s in common.items()) + "}")
        exceptions = [(m, c) for m, c in members if c.setting != common[m.kind]]
        if exceptions:
            lines.append("    per_layer:")
            lines += [f"      - {{layers: '{re.escape(m.name)}', block_size: {c.setting.block_size}, n_centroids: {c.setting.n_centroids}}}"
                      for m, c in exceptions]
    text = "\n".join(lines) + "\n"
    check_schedule_text(text, plan, model)
    return text


def check_schedule_text(text: str, plan: Plan, model: nn.Module) -> None:
    """The YAML parses, validates, and gives each weight exactly its planned setting (and leaves the rest out)."""
    import yaml

    schedule = schedule_from_dict(yaml.safe_load(text), "<plan>")
    layers = {p.name: (p.block_size, p.n_centroids) for stage in plan_schedule(schedule, model, "<plan>") for p in stage.layers}
    wanted = {m.name: (c.setting.block_size, c.setting.n_centroids) for m, c in zip(plan.menus, plan.picks) if c.setting.is_pq}
    if layers != wanted:
        wrong = sorted(set(layers.items()) ^ set(wanted.items()))[0][0]
        raise AssertionError(f"the planned schedule does not give layer {wrong} its planned setting")
