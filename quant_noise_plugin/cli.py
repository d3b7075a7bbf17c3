"""The ``quant-noise`` command: size, inspect, schedule, plan, pack, prune, unpack, data."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

logger = logging.getLogger("quant_noise")


def _load_model(state, path: str, data: Optional[str]):
    """Build the checkpoint's model with fairseq (plugin registered) and load its weights."""
    import quant_noise_plugin  # noqa: F401  (registers archs and tasks)
    from fairseq import checkpoint_utils

    from .checkpoints import CheckpointError

    cfg = state["cfg"]
    task_cfg = cfg["task"]
    data_dir = data or (task_cfg.get("data") if isinstance(task_cfg, dict) else getattr(task_cfg, "data", None))
    if not data_dir or not Path(str(data_dir).split(":")[0]).is_dir():
        raise CheckpointError(f"{path}: its data directory {data_dir!r} (for the dictionaries) is not here; pass --data DIR")
    import copy

    from fairseq.dataclass.utils import overwrite_args_by_name
    from omegaconf import OmegaConf

    # What fairseq's load_checkpoint_to_cpu does after torch.load, on our already-validated state.
    fairseq_state = dict(state)
    fairseq_state["cfg"] = OmegaConf.create(copy.deepcopy(cfg), flags={"allow_objects": True})
    overwrite_args_by_name(fairseq_state["cfg"], {"data": data_dir})
    fairseq_state = checkpoint_utils._upgrade_state_dict(fairseq_state)
    try:
        models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], state=fairseq_state)
    except Exception as e:
        raise CheckpointError(f"{path}: fairseq could not build/load its model ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    model = models[0]
    model.eval()
    return model, task


def _size_summary(model, state, path: Optional[str] = None, centroid_bits: Optional[int] = None) -> dict:
    """Per-layer rows and totals; the packed file's bytes as packing.predicted_file serializes it in memory."""
    from .packing import predicted_file
    from .sizes import activation_quantizers

    predicted = predicted_file(model, state, centroid_bits)
    paper, dense = predicted["compressed_bytes"], predicted["dense_fp32_bytes"]
    summary = {
        "layers": [r.__dict__ | {"shape": list(r.shape)} for r in predicted["rows"]],
        "activations": [{"layer": name, "bits": int(q.n_bits), "scale": q.params[0], "zero_point": q.params[1]}
                        for name, q in activation_quantizers(model)],
        "dense_fp32_bytes": dense,
        "compressed_bytes": paper,
        "predicted_packed_file_bytes": predicted["predicted_packed_file_bytes"],
        "compression_ratio": dense / paper if paper else None,
    }
    if path is not None:
        summary["file_bytes"] = os.path.getsize(path)
    return summary


def _print_size(summary: dict, out=sys.stdout) -> None:
    header = f"{'layer':48s} {'shape':>14s} {'method':>9s} {'bs':>3s} {'K':>5s} {'bits/w':>7s} {'bytes':>11s}"
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in summary["layers"]:
        shape = "x".join(str(s) for s in r["shape"])
        print(
            f"{r['name'][:48]:48s} {shape:>14s} {r['method']:>9s} {r['block_size'] or '':>3} {r['n_centroids'] or '':>5} "
            f"{r['bits_per_weight']:7.2f} {r['bytes']:11,.0f}",
            file=out,
        )
    print("-" * len(header), file=out)
    if summary["activations"]:
        print(f"int8 inputs of {len(summary['activations'])} Linear layers (per-tensor affine, uint8 codes):", file=out)
        for a in summary["activations"]:
            print(f"  {a['layer'][:56]:56s} scale {a['scale']:.6g}  zero point {a['zero_point']:3d}", file=out)
        print("-" * len(header), file=out)
    mb = 1e6
    print(f"dense fp32 size:                  {summary['dense_fp32_bytes'] / mb:10.3f} MB", file=out)
    quantized = any(r["method"].startswith(("pq", "int", "act")) for r in summary["layers"])
    if quantized:
        print(f"compressed size (paper counting): {summary['compressed_bytes'] / mb:10.3f} MB", file=out)
    else:
        print(f"fp16 size (no layer is quantized): {summary['compressed_bytes'] / mb:10.3f} MB", file=out)
    print(f"packed file size (predicted):     {summary['predicted_packed_file_bytes'] / mb:10.3f} MB", file=out)
    if "file_bytes" in summary:
        print(f"this file on disk:                {summary['file_bytes'] / mb:10.3f} MB", file=out)
    if quantized:
        print(f"compression ratio (fp32 / compressed): x{summary['compression_ratio']:.1f}", file=out)
    else:
        print(f"compression ratio: x{summary['compression_ratio']:.1f} from fp16 storage alone; run iPQ "
              f"(--task ipq_*) or `quant-noise pack --scalar-bits 8` to quantize", file=out)


def cmd_size(args) -> int:
    from .checkpoints import PACKED_MARKER, is_packed, read_checkpoint

    state = read_checkpoint(args.checkpoint)
    model, _ = _load_model(state, args.checkpoint, args.data)
    centroid_bits = state.get(PACKED_MARKER, {}).get("scalar_bits")  # packed centroids load back as floats
    summary = _size_summary(model, state, args.checkpoint, centroid_bits=centroid_bits)
    summary["packed"] = is_packed(state)
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        print()
    else:
        _print_size(summary)
    return 0


def cmd_inspect(args) -> int:
    """What computes each compressed layer on this machine (int8 kernel, float), and why."""
    import torch

    from .checkpoints import read_checkpoint
    from .codes_weight import INFERENCE_SWITCH, inference_mode
    from .decoded import LOW_MEMORY_SWITCH, low_memory
    from .inference import compute_report, held_tensor_bytes
    from .int8_linear import KERNEL_SWITCH, kernel_support, kernel_switch

    state = read_checkpoint(args.checkpoint)
    model, _ = _load_model(state, args.checkpoint, args.data)
    model.eval()
    with torch.no_grad():
        rows = compute_report(model)
    support = kernel_support()
    machine = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
               "int8_activation_bits": support.activation_bits, "int8_kernel": support.reason,
               KERNEL_SWITCH: kernel_switch(), LOW_MEMORY_SWITCH: int(low_memory()), INFERENCE_SWITCH: inference_mode(),
               "model_tensor_bytes_at_load": held_tensor_bytes(model)}
    if args.json:
        json.dump({"machine": machine, "layers": rows}, sys.stdout, indent=1)
        print()
        return 0
    print(f"this machine: {machine['cpu_capability']}, {machine['threads']} threads; int8 kernel: "
          + (f"{support.activation_bits}-bit activations ({support.reason})" if support.activation_bits else f"none ({support.reason})"))
    print(f"{KERNEL_SWITCH}={machine[KERNEL_SWITCH]}, {LOW_MEMORY_SWITCH}={machine[LOW_MEMORY_SWITCH]}, "
          f"{INFERENCE_SWITCH}={machine[INFERENCE_SWITCH]}; model tensors at load: {machine['model_tensor_bytes_at_load'] / 1e6:.3f} MB")
    header = f"{'layer':44s} {'weight':>18s} {'input':>6s} {'compute':>24s}  why"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['layer'][:44]:44s} {r['weight']:>18s} {r['input']:>6s} {r['compute']:>24s}  {r['why']}")
    return 0


def cmd_schedule(args) -> int:
    from .bitpack import bits_for
    from .checkpoints import read_checkpoint
    from .sizes import dense_fp32_bytes, size_rows
    from .schedule import load_schedule, plan_schedule

    schedule = load_schedule(args.schedule)
    state = read_checkpoint(args.checkpoint)
    model, task = _load_model(state, args.checkpoint, args.data)
    plans = plan_schedule(schedule, model, args.schedule)
    dense = dense_fp32_bytes(model)
    size = sum(r.bytes for r in size_rows(model))  # fp16 everything
    print(f"{args.schedule}: {len(plans)} stages, {schedule.total_updates} updates; start: {size / 1e6:.3f} MB fp16, {dense / 1e6:.3f} MB fp32")
    errors = _objective_errors(state, model, task, args, schedule, [p for stage in plans for p in stage.layers]) if args.calibrate else {}
    if errors:
        print("errors of each objective's fit on this model (no finetuning, earlier stages not applied), relative to the "
              "weight: weight = ||dW||^2, output = sum E[x^2] dW^2 (the activations objective's estimate), with E[x x^T] = "
              "sum dW E[x x^T] dW^T (what the output objective minimizes, embedding rows weighted by frequency; layers a "
              "Linear uses); objective weights -> activations -> output")
    for stage in plans:
        every = stage.layers[0].reassign_every
        moving = f"; codes reassigned every {every} updates" if every else ""
        print(f"\nstage {stage.index} '{stage.name}': updates {stage.start_update}..{stage.start_update + stage.updates - 1}{moving}")
        for plan in stage.layers:
            size += plan.compressed_bytes - plan.n_weights * 2
            tied = f" (tied: {', '.join(plan.names[1:])})" if len(plan.names) > 1 else ""
            print(
                f"  {plan.name:46s} {'x'.join(map(str, plan.shape)):>12s} {plan.kind:9s} bs={plan.block_size:<3d} "
                f"K={plan.n_centroids:<5d} {bits_for(plan.n_centroids) / plan.block_size:.2f} bits/w{tied}"
            )
            if plan.name in errors:
                weight_errors, output_estimates, output_errors = zip(*errors[plan.name])
                line = f"    stage's objective {plan.objective}: weight error {_arrows(weight_errors)}, output error {_arrows(output_estimates)}"
                if output_errors[0] is not None:
                    line += f", with E[x x^T]: {_arrows(output_errors)}"
                print(line)
        print(f"  -> predicted size after stage: {size / 1e6:.3f} MB (x{dense / size:.1f} vs fp32)")
    return 0


def _arrows(values) -> str:
    return " -> ".join(f"{v:.4f}" for v in values)


def _objective_errors(state, model, task, args, schedule, plans) -> dict:
    """Per plan and objective (weights, activations, output), the relative (weight, diagonal output estimate, output)
    errors of that objective's fit (the output objective and error: a weight with no Linear use has none; the output
    objective then keeps the activations fit, as the iPQ task does)."""
    from .calibration import collect_input_moments
    from .gptq import output_error
    from .pq import PQCodebook

    batches, criterion = _calibration_batches(state, model, task, args.calibrate, args.calibration_batches)
    moments = collect_input_moments(model, {p.name: p.names for p in plans}, batches, lambda sample: criterion(model, sample), full=True)
    errors = {}
    for plan in plans:
        stats = moments[plan.name]
        weight = model.get_submodule(plan.name).weight.detach().float()
        importance = stats.importance_for(weight)  # uniform for a weight the task never runs: its weights are fitted
        hessian = stats.output_hessian()
        row = []
        for fit in ({}, {"importance": importance}, {"importance": importance, "hessian": hessian, "row_weights": stats.row_weights()}):
            codebook = PQCodebook(weight.shape, plan.block_size, plan.n_centroids)
            codebook.fit(weight, n_iter=schedule.kmeans_iterations, seed=schedule.seed, **fit)
            approx = codebook().detach()
            delta = (weight - approx) ** 2
            row.append((float(delta.sum() / (weight ** 2).sum()), float((importance * delta).sum() / (importance * weight ** 2).sum()),
                        None if hessian is None else output_error(weight, approx, hessian, stats.row_weights())))
        errors[plan.name] = row
    return errors


def cmd_pack(args) -> int:
    from .checkpoints import (
        PACKED_FORMAT, PACKED_MARKER, CheckpointError, is_packed, packed_config_crc32, read_checkpoint, use_plugin_names,
        without_namespaces, write_checkpoint_atomically,
    )
    from .integrity import with_checksums
    from .activations import check_activation_bits
    from .calibration import calibrate_activations_
    from .compressed import scalar_quantize_remaining_
    from .packing import pack_state_dict

    state = read_checkpoint(args.checkpoint)
    if is_packed(state):
        calibrated = " and calibrated (int8 activations)" if any(".input_quant." in k for k in state["model"]) else ""
        raise CheckpointError(f"{args.checkpoint}: already packed{calibrated}; pack the training checkpoint it came from instead")
    bits = args.scalar_bits
    if bits is None and "ipq_schedule" in (state.get("task_state") or {}):
        bits = state["task_state"]["ipq_schedule"].get("final_scalar_bits")
    activations = args.activation_bits is not None
    if activations:
        check_activation_bits(args.activation_bits)
        if not args.calibrate:
            raise CheckpointError("--activation-bits 8 needs --calibrate DATA_DIR (training batches fix the activation ranges)")
        if bits != 8:
            raise CheckpointError(f"--activation-bits 8 needs int8 weights: add --scalar-bits 8 (now: {bits or 'none'})")
    elif args.calibrate and args.scalar_method != "gptq":
        raise CheckpointError("--calibrate is for int8 activations (add --activation-bits 8) or --scalar-method gptq")
    if args.per_tensor and not args.scalar_bits:
        raise CheckpointError("--per-tensor is how --scalar-bits quantizes: add --scalar-bits N")
    if args.scalar_method == "gptq" and not (args.scalar_bits and args.calibrate):
        raise CheckpointError("--scalar-method gptq needs --scalar-bits N and --calibrate DATA_DIR (its error feedback weighs by the layers' inputs)")
    use_plugin_names(state["cfg"])
    model, task = _load_model(state, args.checkpoint, args.data)
    batches = criterion = None
    if args.calibrate:
        batches, criterion = _calibration_batches(state, model, task, args.calibrate, args.calibration_batches)
    if bits:
        hessians = _input_hessians(model, batches, criterion) if args.scalar_method == "gptq" else None
        done = scalar_quantize_remaining_(model, bits, symmetric=activations, per_channel=not args.per_tensor, hessians=hessians)
        logger.info("int%d codes%s for %d layers left in float%s%s", bits, " (per tensor)" if args.per_tensor else "", len(done),
                    " (symmetric, for int8 kernels)" if activations else "",
                    f", {len(hessians)} by error feedback (gptq) over {len(batches)} batches" if hessians is not None else "")
    marker = {"packed": True, "format": PACKED_FORMAT, "scalar_bits": bits, "per_tensor": bool(args.per_tensor), "source": os.path.basename(args.checkpoint)}
    if bits and args.scalar_method == "gptq":
        marker.update(scalar_method="gptq", calibration_batches=len(batches))
    if activations:
        # the training criterion runs the model as the task does (e.g. through a classification head)
        params = calibrate_activations_(model, batches, lambda sample: criterion(model, sample), args.observer, args.activation_bits)
        logger.info("int8 inputs for %d Linear layers, %s observer over %d batches of %s", len(params), args.observer, len(batches), args.calibrate)
        marker.update(activation_bits=args.activation_bits, observer=args.observer, calibration_batches=len(batches))
    packed = {k: v for k, v in state.items() if k not in ("model", "last_optimizer_state")}
    packed["cfg"] = without_namespaces(state["cfg"])
    if isinstance(packed.get("task_state"), dict):  # the schedule and layout describe training; a packed file's keys say it all
        packed["task_state"] = {k: v for k, v in packed["task_state"].items() if not k.startswith("ipq_")}
    packed["model"] = with_checksums(pack_state_dict(model, centroid_bits=bits, symmetric=activations))
    packed[PACKED_MARKER] = marker
    marker["config_crc32"] = packed_config_crc32(packed)
    summary = _size_summary(model, packed, centroid_bits=bits)
    nbytes = write_checkpoint_atomically(packed, args.output)
    predicted = summary["predicted_packed_file_bytes"]
    print(
        f"packed {args.checkpoint} -> {args.output}: {nbytes / 1e6:.3f} MB on disk, predicted {predicted / 1e6:.3f} MB "
        f"({100 * (nbytes - predicted) / predicted:+.1f}%), x{summary['dense_fp32_bytes'] / nbytes:.1f} smaller than fp32"
    )
    return 0


def _input_hessians(model, batches, criterion) -> dict:
    """E[x x^T] of each not-yet-compressed weight's Linear use, on the calibration batches (the model as it is:
    PQ layers already in their compressed form); weights with no Linear use (an untied embedding) are absent."""
    from .calibration import collect_input_moments
    from .providers import provider_of
    from .schedule import quantizable_weights

    modules = dict(model.named_modules(remove_duplicate=False))
    targets = {names[0]: names for names in quantizable_weights(model).values() if provider_of(modules[names[0]]) is None}
    moments = collect_input_moments(model, targets, batches, lambda sample: criterion(model, sample), full=True)
    return {name: m.hessian() for name, m in moments.items() if m.input_outer is not None}


def _calibration_batches(state, model, model_task, data_dir: str, n_batches: int, max_tokens: int = 2048):
    """``n_batches`` shuffled training batches of ``data_dir`` (which must share the model's
    dictionaries), and the checkpoint's training criterion to run them through the model."""
    import copy

    from fairseq import tasks
    from fairseq.dataclass.utils import overwrite_args_by_name
    from omegaconf import OmegaConf

    from .checkpoints import CheckpointError
    from .tasks.ipq import training_batches

    if not Path(data_dir).is_dir():
        raise CheckpointError(f"--calibrate {data_dir}: no such directory")
    if n_batches <= 0:
        raise CheckpointError(f"--calibration-batches {n_batches}: must be at least 1")
    cfg = OmegaConf.create(copy.deepcopy(state["cfg"]), flags={"allow_objects": True})
    overwrite_args_by_name(cfg, {"data": str(data_dir)})
    try:
        task = tasks.setup_task(cfg.task)
    except (FileNotFoundError, OSError) as e:
        raise CheckpointError(f"--calibrate {data_dir}: not a fairseq data directory of this task ({e})") from None
    for side in ("source_dictionary", "target_dictionary"):
        ours, theirs = getattr(model_task, side, None), getattr(task, side, None)
        if ours is not None and theirs is not None and ours.symbols != theirs.symbols:
            raise CheckpointError(
                f"--calibrate {data_dir}: its {side.replace('_', ' ')} ({len(theirs)} types) is not the model's "
                f"({len(ours)} types): calibrate on data binarized with the model's dictionaries"
            )
    try:
        task.load_dataset("train", combine=False)
    except (FileNotFoundError, OSError) as e:
        raise CheckpointError(f"--calibrate {data_dir}: no training split ({e})") from None
    batches = training_batches(task, model, n_batches, max_tokens)
    return batches, task.build_criterion(cfg.criterion)


def cmd_unpack(args) -> int:
    import copy

    import torch

    from .checkpoints import PACKED_MARKER, read_checkpoint, use_stock_names, write_checkpoint_atomically
    from .providers import INPUT_CHILD, PROVIDER_CHILDREN, provider_of
    from .sizes import storage_key

    state = read_checkpoint(args.checkpoint)
    model, _ = _load_model(state, args.checkpoint, args.data)
    dense, computed = {}, {}
    with torch.no_grad():
        for name, module in model.named_modules(remove_duplicate=False):
            provider = provider_of(module)
            if provider is not None:  # tied layers share one provider: store one tensor for them
                if id(provider) not in computed:
                    computed[id(provider)] = provider().detach().float().clone()
                dense[f"{name}.weight"] = computed[id(provider)]
        for key, tensor in model.state_dict().items():  # activation scales are dropped: stock fairseq computes in float
            if not any(f".{c}." in key for c in (*PROVIDER_CHILDREN, INPUT_CHILD)):
                memo = storage_key(tensor)
                if memo not in computed:
                    computed[memo] = tensor.float() if tensor.is_floating_point() else tensor
                dense[key] = computed[memo]
    out = {k: copy.deepcopy(v) for k, v in state.items() if k not in ("model", "last_optimizer_state", PACKED_MARKER)}
    use_stock_names(out["cfg"])
    if isinstance(out.get("task_state"), dict):
        out["task_state"] = {k: v for k, v in out["task_state"].items() if not k.startswith("ipq_")}
    out["model"] = dense
    nbytes = write_checkpoint_atomically(out, args.output)
    print(f"unpacked {args.checkpoint} -> {args.output}: dense, {nbytes / 1e6:.3f} MB, loads in stock fairseq without --user-dir")
    return 0


def cmd_prune(args) -> int:
    from .checkpoints import read_checkpoint, write_checkpoint_atomically
    from .pruning import parse_keep, prune_checkpoint

    keep = parse_keep(args.keep)
    state = read_checkpoint(args.checkpoint)
    pruned, stack, depth = prune_checkpoint(state, keep, args.stack, source=args.checkpoint)
    nbytes = write_checkpoint_atomically(pruned, args.output)
    print(f"pruned {args.checkpoint} -> {args.output}: {stack}layers {','.join(map(str, keep))} of {depth} kept, "
          f"renumbered 0-{len(keep) - 1}; {nbytes / 1e6:.3f} MB; loads in fairseq with no override")
    return 0


def cmd_plan(args) -> int:
    """A schedule YAML whose packed file lands on a size budget (budget.py)."""
    import time

    from .atomic import atomic_file
    from .budget import ANCHORS, BudgetError, parse_size, plan_schedule_for_budget
    from .checkpoints import _get, read_checkpoint
    from .planner.check import Candidate
    from .sizes import dense_fp32_bytes

    if args.updates <= 0:
        raise BudgetError(f"--updates {args.updates}: must be > 0 (the finetuning updates of the whole schedule)")
    if args.anchors is not None and (args.measure_all or args.sensitivity == "fisher"):
        raise BudgetError(f"--anchors {args.anchors}: the measured settings per layer, for the default sensitivity without --measure-all")
    if args.measure_all and args.sensitivity == "fisher":
        raise BudgetError("--measure-all measures every setting's rise; --sensitivity fisher estimates them instead: give one")
    if args.target_ratio is not None and not args.target_ratio > 1:
        raise BudgetError(f"--target-ratio {args.target_ratio}: must be > 1 (how many times smaller than the fp32 model)")
    for flag, values in (("--block-sizes", args.block_sizes), ("--centroids", args.centroids)):
        if min(values) < 1:
            raise BudgetError(f"{flag} {' '.join(map(str, values))}: every value must be >= 1")
    target = None if args.target_ratio is not None else parse_size(args.target_size)
    candidates = [Candidate.from_file(path) for path in args.candidates or []]
    state = read_checkpoint(args.checkpoint)
    model, task = _load_model(state, args.checkpoint, args.data)
    dense = dense_fp32_bytes(model)
    if target is None:
        target = int(dense / args.target_ratio)
    scalar_bits = args.scalar_bits or None
    start = time.perf_counter()
    batches, criterion = _calibration_batches(state, model, task, args.calibrate, args.calibration_batches)
    title = f"Planned by `quant-noise plan {os.path.basename(args.checkpoint)} --target-{'ratio ' + str(args.target_ratio) if args.target_ratio else 'size ' + args.target_size}`"
    layerdrop = None if args.no_pruning else {side: _get(state["cfg"]["model"], f"{side}_layerdrop") for side in ("encoder", "decoder")}
    plan, text = plan_schedule_for_budget(model, state, batches, lambda sample: criterion(model, sample), target, scalar_bits,
                                          args.objective, args.updates, args.block_sizes, args.centroids, args.measure_all,
                                          title, progress=logger.info, sensitivity=args.sensitivity, anchors=args.anchors or ANCHORS,
                                          layerdrop=layerdrop, run_for=lambda m: (lambda sample: criterion(m, sample)),
                                          candidates=candidates)
    with atomic_file(args.output) as tmp:
        tmp.write_text(text)
    seconds = time.perf_counter() - start
    print(f"planned {args.checkpoint} -> {args.output}: packed file {plan.predicted_file_bytes / 1e6:.4f} MB predicted for a target of "
          f"{target / 1e6:.4f} MB ({plan.predicted_file_bytes / target:.2%}), x{dense / plan.predicted_file_bytes:.1f} smaller than fp32; "
          f"{sum(c.setting.is_pq for c in plan.picks)} of {len(plan.picks)} weights in PQ; {seconds:.1f} s")
    for note in plan.notes:
        print(f"note: {note}")
    for line in plan.depth_lines + plan.check_lines:
        print(line)
    if plan.kept_candidate:
        print(f"wrote {args.output}: the candidate {plan.kept_candidate} (the plan below measured worse)")
    if plan.pruned is not None and plan.pruned.prunes:
        print(f"next: quant-noise prune {args.checkpoint} --keep {','.join(map(str, plan.pruned.kept))} --stack "
              f"{plan.pruned.stack.split('.')[0]} -o PRUNED.pt, then iPQ from PRUNED.pt with {args.output}")
    bits = plan.scalar_bits
    for menu, choice in zip(plan.menus, plan.picks):
        print(f"  {menu.name[:46]:46s} {'x'.join(map(str, menu.shape)):>12s} {choice.setting.label(bits):>12s} "
              f"{choice.setting.bits_per_weight(bits):5.2f} bits/w {choice.bytes:>10,} B  est. rise {choice.rise:+.5f}")
    return 0


def cmd_data(args) -> int:
    from .data_prep import prepare

    prepare(args.output, force=args.force, tiny=args.tiny)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The subcommands in the order a compression runs: data, prune, schedule / plan, pack, size, inspect, unpack."""
    from .activations import OBSERVERS
    from .scalar import SUPPORTED_BITS
    from .schedule import OBJECTIVES

    parser = argparse.ArgumentParser(
        prog="quant-noise", description="Quant-Noise + iPQ compression for fairseq models: the steps around fairseq-train.",
        epilog="The whole recipe, with the fairseq commands between these steps: docs/usage.md (in the repository).")
    parser.add_argument("--verbose", action="store_true", help="also show fairseq's own log lines (import notices, dictionaries)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    checkpoint_help = "a fairseq checkpoint (.pt): trained, mid-iPQ or packed"
    data_help = "the data directory with the model's dictionaries (default: the one the checkpoint was trained on)"

    p = sub.add_parser("data", help="prepare the KJV LM and KJV/RV1909 translation corpora (installs Debian's bible-kjv and sword texts)")
    p.add_argument("--output", default="data", help="where the corpora go (default data/)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--tiny", action="store_true", help="a small slice (for tests)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("prune", help="keep some layers of a model trained with LayerDrop: a checkpoint of that depth (dense or packed)")
    p.add_argument("checkpoint", help="a trained model (before iPQ) or a packed file")
    p.add_argument("--keep", required=True, metavar="I,J,...", help="the layers to keep, in order, e.g. 0,2,4,6 (every other layer)")
    p.add_argument("--stack", help="which stack's layers, e.g. decoder or encoder (needed where the model has two)")
    p.add_argument("-o", "--output", required=True, help="the pruned checkpoint")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("schedule", help="show what an iPQ schedule would quantize and the sizes it predicts, without training")
    p.add_argument("checkpoint", help="the checkpoint the iPQ run would start from")
    p.add_argument("schedule", help="the schedule YAML (e.g. configs/ipq/qn_transformer_lm.yaml)")
    p.add_argument("--data", help=data_help)
    p.add_argument("--calibrate", metavar="DATA_DIR",
                   help="binarized training data: also show each layer's weight and output errors under each objective (weights, activations, output)")
    p.add_argument("--calibration-batches", type=int, default=32, help="training batches of --calibrate to run (default 32)")
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser("plan", help="a schedule YAML whose packed file lands on a size budget, chosen per layer by measured sensitivity")
    p.add_argument("checkpoint", help="the dense (or Quant-Noise trained) checkpoint to compress")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-size", metavar="SIZE", help="the packed file's size: 200KB, 0.2MB, 1.5MiB or bytes")
    target.add_argument("--target-ratio", type=float, metavar="R", help="the packed file R times smaller than the fp32 model")
    p.add_argument("--calibrate", metavar="DATA_DIR", required=True, help="binarized training data (the model's dictionaries): "
                   "its batches measure each layer's loss rise")
    p.add_argument("-o", "--output", required=True, help="the schedule YAML to write")
    p.add_argument("--data", help=data_help)
    p.add_argument("--calibration-batches", type=int, default=8, help="training batches of --calibrate (default 8)")
    p.add_argument("--scalar-bits", type=int, choices=(0, 4, 8), default=8,
                   help="layers left out of PQ and the centroids as int codes at pack (the schedule's final_scalar_bits; 0: fp16)")
    p.add_argument("--objective", choices=OBJECTIVES, default="output", help="the schedule's k-means objective (default output)")
    p.add_argument("--updates", type=int, default=500, help="finetuning updates of the whole schedule, split over its stages (default 500)")
    p.add_argument("--block-sizes", type=int, nargs="+", default=[4, 8, 16], help="PQ block sizes to choose from (default 4 8 16)")
    p.add_argument("--centroids", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128, 256],
                   help="centroid counts to choose from (default 4 8 ... 256)")
    p.add_argument("--measure-all", action="store_true", help="measure the loss rise of every setting of every layer "
                   "(slow; default: measured at two settings per layer, carried to the others by their activation-weighted error)")
    p.add_argument("--sensitivity", choices=("measured", "fisher"), default="measured",
                   help="measured (default: the calibration batches run at two settings per layer, --anchors) or fisher (one "
                        "backward pass per batch in all: each setting's rise estimated from squared gradients; for models too "
                        "large for the former)")
    p.add_argument("--anchors", type=int, choices=(1, 2), default=None,
                   help="measured: the settings per layer whose rise is measured: 2 (default: the one nearest the budget's bits and "
                        "the coarsest, the rise linear in the error between them) or 1 (the first alone: half the measurements, but "
                        "a model trained with noise shows no rise there and its coarse settings then look free)")
    p.add_argument("--candidates", nargs="+", metavar="YAML", help="schedules to measure the plan against (e.g. the shipped one "
                   "at this size): every weight quantized at once, the calibration loss of each; a candidate that measures lower "
                   "and fits the budget is written instead of the plan")
    p.add_argument("--no-pruning", action="store_true", help="plan every layer, even of a model trained with LayerDrop (default: "
                   "such a model is also planned with every other layer kept, and the depth predicting the lower loss is chosen)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("pack", help="inference-only checkpoint: bit-packed codes, fp16/int8 rest")
    p.add_argument("checkpoint", help="an iPQ (or any) checkpoint to pack")
    p.add_argument("output", help="the packed file to write")
    p.add_argument("--data", help=data_help)
    p.add_argument("--scalar-bits", type=int, choices=SUPPORTED_BITS, default=None, help="int codes for layers left in float and the centroids")
    p.add_argument("--per-tensor", action="store_true", help="one scale and zero point per weight instead of per output row "
                   "(the paper's scalar baseline; with --scalar-bits)")
    p.add_argument("--activation-bits", type=int, default=None,
                   help="8: int8 inputs for every quantized Linear (needs --scalar-bits 8 and --calibrate); int8 kernels on the CPU")
    p.add_argument("--scalar-method", choices=("rtn", "gptq"), default="rtn",
                   help="how --scalar-bits picks codes: rtn (round to nearest, default) or gptq (error feedback from the layers' "
                        "inputs on --calibrate's batches: lower output error, same format and size)")
    p.add_argument("--calibrate", metavar="DATA_DIR", help="binarized data (the model's dictionaries) whose training batches fix the "
                   "activation ranges (--activation-bits 8) or weigh the errors (--scalar-method gptq)")
    p.add_argument("--calibration-batches", type=int, default=32, help="training batches of --calibrate to observe (default 32)")
    p.add_argument("--observer", choices=OBSERVERS, default="mse", help="how a range is chosen from the observed activations (default mse)")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("size", help="per-layer size table and totals of a checkpoint, and its packed file's bytes")
    p.add_argument("checkpoint", help=checkpoint_help)
    p.add_argument("--data", help=data_help)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_size)

    p = sub.add_parser("inspect", help="what computes each compressed layer on this machine (int8 kernel or float), and why")
    p.add_argument("checkpoint", help=checkpoint_help)
    p.add_argument("--data", help=data_help)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("unpack", help="dense checkpoint that stock fairseq loads without the plugin")
    p.add_argument("checkpoint", help="a packed or iPQ checkpoint")
    p.add_argument("output", help="the dense checkpoint to write")
    p.add_argument("--data", help=data_help)
    p.set_defaults(func=cmd_unpack)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = getattr(args, "json", False)  # keep stdout machine-readable
    # a command's output is its own: fairseq's import chatter and dictionary lines only with --verbose
    logging.basicConfig(level=logging.INFO if args.verbose and not quiet else logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                        force=True)  # fairseq configured the root logger at import
    logging.getLogger("fairseq").setLevel(logging.NOTSET if args.verbose else logging.WARNING)
    for own in ("quant_noise", "quant_noise_plugin"):
        logging.getLogger(own).setLevel(logging.WARNING if quiet else logging.INFO)
    # the load lines say how a model will compute: that is inspect's output, and noise for the tools that only read
    # and write files; those also skip measuring lookup-table speeds at load (the numbers are the same either way)
    logging.getLogger("quant_noise_plugin.inference").setLevel(logging.INFO if args.verbose and not quiet else logging.WARNING)
    if args.command != "inspect":
        from .codes_weight import INFERENCE_SWITCH

        os.environ.setdefault(INFERENCE_SWITCH, "decoded")
    from .checkpoints import CheckpointError
    from .schedule import ScheduleError

    try:
        return args.func(args)
    except (CheckpointError, ScheduleError, ValueError, RuntimeError) as e:  # DataError is a RuntimeError
        print(f"quant-noise {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
