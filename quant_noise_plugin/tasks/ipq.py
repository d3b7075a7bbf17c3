"""iPQ tasks: ``--task ipq_language_modeling`` / ``ipq_translation`` / ``ipq_masked_lm`` / ``ipq_sentence_prediction``.

fairseq's own tasks plus a schedule: at the first update of each stage the stage's layers are
k-means'd into PQ codebooks, then the centroids and every parameter still in float are finetuned
for the stage's updates. One ``fairseq-train`` invocation runs the whole schedule.

Every codebook of the schedule is created (unfitted) when the model is built, so the set of
parameters never changes during training: the optimizer, the trainer and a resumed run all see
the same parameters, and which layers are quantized is part of the model's own state dict.
The same tasks load compressed checkpoints for fairseq-eval-lm / fairseq-generate / the hub:
the plugin architectures rebuild the compressed layers from the checkpoint's own keys.
"""
import logging
import math
import os
import resource
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask
from fairseq.tasks.masked_lm import MaskedLMConfig, MaskedLMTask
from fairseq.tasks.sentence_prediction import SentencePredictionConfig, SentencePredictionTask
from fairseq.tasks.translation import TranslationConfig, TranslationTask
from omegaconf import II

from ..calibration import collect_input_moments
from ..compressed import PROVIDER_CHILDREN, attach_pq_plan, fit_pq, is_fitted, layout_of, provider_of, reassign_pq
from ..models.compressed_loading import CompressedLoadingMixin
from ..schedule import ScheduleError, load_schedule, plan_schedule, schedule_to_dict
from ..sizes import dense_fp32_bytes, size_rows

logger = logging.getLogger(__name__)

PLAN_FILE = "ipq_plan.yaml"  # --ipq-target-size: the planned schedule, beside the run's checkpoints


def training_batches(task, model: torch.nn.Module, n_batches: int, max_tokens: int = 2048, seed: int = 1) -> list:
    """The first ``n_batches`` shuffled batches of ``task``'s training split (loaded): calibration data, the same
    batches for the same seed."""
    from fairseq import utils

    config = getattr(task, "cfg", None) or getattr(task, "args", None)
    max_tokens = max(max_tokens, int(getattr(config, "tokens_per_sample", 0) or 0))  # at least one whole sample a batch
    batches = []
    with warnings.catch_warnings():  # fairseq's iterator always asks for pinned memory; on a CPU-only machine torch warns
        warnings.filterwarnings("ignore", message=".*pin_memory.*")
        iterator = task.get_batch_iterator(
            dataset=task.dataset("train"), max_tokens=max_tokens, ignore_invalid_inputs=True, seed=seed,
            disable_iterator_cache=True,  # a cached iterator would be the trainer's own: advancing it would skip its epoch
            max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ).next_epoch_itr(shuffle=True)
        for sample in iterator:
            if len(batches) == n_batches:
                break
            batches.append(sample)
    return batches


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside fairseq's distributed wrappers (ModuleProxyWrapper around DDP or legacy DDP: two levels)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


@dataclass
class IPQOptions(FairseqDataclass):
    ipq_config: Optional[str] = field(default=None, metadata={"help": "YAML iPQ schedule (see configs/ipq/)"})
    ipq_target_size: Optional[str] = field(
        default=None, metadata={"help": "instead of --ipq-config: the packed file's size (200KB, 0.2MB) or ratio to fp32 (x40); "
                                        "`quant-noise plan` runs at the start on --finetune-from-model's weights and writes "
                                        "SAVE_DIR/ipq_plan.yaml, which a resumed run reuses"}
    )
    ipq_candidates: Optional[str] = field(
        default=None, metadata={"help": "with --ipq-target-size: schedules (comma-separated YAML paths) to measure the plan "
                                        "against, as `quant-noise plan --candidates` does; one that measures lower and fits "
                                        "the budget is run instead"}
    )
    ipq_kmeans_backend: str = field(default="auto", metadata={"help": "k-means backend: auto, faiss or torch"})
    ipq_calibration_batches: int = field(
        default=32, metadata={"help": "training batches (2048 tokens) whose layer inputs weigh the k-means of 'objective: activations' stages"}
    )
    ipq_distill_weight: float = field(
        default=0.0, metadata={"help": "weight of a KL term to the uncompressed model's predictions while finetuning"}
    )
    ipq_distill_teacher: Optional[str] = field(
        default=None, metadata={"help": "dense checkpoint used as distillation teacher (default: the model as restored)"}
    )
    max_update: int = II("optimization.max_update")
    restore_file: str = II("checkpoint.restore_file")
    reset_optimizer: bool = II("checkpoint.reset_optimizer")
    save_dir: str = II("checkpoint.save_dir")
    finetune_from_model: Optional[str] = II("checkpoint.finetune_from_model")


class IPQTaskMixin:
    """The schedule logic shared by the LM and translation tasks."""

    def _ipq_init(self, cfg) -> None:
        self.ipq_cfg = cfg
        self.ipq_schedule = None
        self.ipq_plans = []
        self.ipq_model = None
        self.teacher = None

    # -- checkpoint state ---------------------------------------------------------------------

    def state_dict(self):
        state = dict(super().state_dict())
        if self.ipq_model is not None:
            state["ipq_layout"] = layout_of(self.ipq_model)  # informational: loaders read the state dict
        if self.ipq_schedule is not None:
            state["ipq_schedule"] = schedule_to_dict(self.ipq_schedule)
        return state

    def load_state_dict(self, state_dict):
        # ipq_* entries describe the checkpoint (read by `quant-noise pack`); the model's own keys
        # say which layers are compressed, so loading needs nothing from them.
        super().load_state_dict({k: v for k, v in state_dict.items() if not k.startswith("ipq_")})

    # -- model --------------------------------------------------------------------------------

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        self._model_cfg = cfg
        if from_checkpoint:
            return model  # inference: the model rebuilds compressed layers from the checkpoint's keys
        if not isinstance(model, CompressedLoadingMixin):
            arch = getattr(cfg, "arch", None) or getattr(cfg, "_name", "?")
            raise ScheduleError(
                f"--arch {arch}: iPQ needs a plugin architecture so that fairseq tools can reload the compressed "
                f"checkpoint; use --arch qn_{arch} (same parameters: {arch} checkpoints load into it)"
            )
        if self.ipq_cfg.ipq_config and self.ipq_cfg.ipq_target_size:
            raise ScheduleError(f"--ipq-config {self.ipq_cfg.ipq_config} and --ipq-target-size {self.ipq_cfg.ipq_target_size}: give one (a target plans its own schedule)")
        if self.ipq_cfg.ipq_candidates and not self.ipq_cfg.ipq_target_size:
            raise ScheduleError(f"--ipq-candidates {self.ipq_cfg.ipq_candidates}: candidates are measured against a plan: add --ipq-target-size")
        if not self.ipq_cfg.ipq_config and not self.ipq_cfg.ipq_target_size:
            raise ScheduleError(f"--task {self.task_name}: --ipq-config SCHEDULE.yaml (or --ipq-target-size SIZE) is required for training")
        self._check_run_flags()
        self._check_ipq_flags()
        schedule_path = self.ipq_cfg.ipq_config or self._planned_schedule(model, cfg)
        self.ipq_schedule = load_schedule(schedule_path)
        total = self.ipq_schedule.total_updates
        if not self.ipq_cfg.max_update:
            raise ScheduleError(f"{schedule_path}: the schedule needs {total} updates: set --max-update {total}")
        if self.ipq_cfg.max_update < total:
            logger.warning("--max-update %d stops before the schedule's %d updates; rerun with --max-update %d to finish", self.ipq_cfg.max_update, total, total)
        self.ipq_plans = plan_schedule(self.ipq_schedule, model, schedule_path)
        for stage in self.ipq_plans:
            for plan in stage.layers:
                attach_pq_plan(model, plan)
        model.register_load_state_dict_pre_hook(self._reject_foreign_quantization)
        model.ipq_training = True
        self.ipq_model = model
        for stage in self.ipq_plans:
            logger.info(
                "ipq stage %d (%s): updates %d-%d, %d weights: %s", stage.index, stage.name, stage.start_update,
                stage.start_update + stage.updates - 1, len(stage.layers), ", ".join(p.name for p in stage.layers),
            )
        return model

    def _planned_schedule(self, model, model_cfg) -> str:
        """--ipq-target-size: the schedule `quant-noise plan` makes for the target from the weights of
        --finetune-from-model, written as SAVE_DIR/ipq_plan.yaml (rank 0; the other ranks wait and read it). A resumed
        run (the file exists) reuses it, so its stages stay the ones the first run started."""
        from ..atomic import atomic_file
        from ..budget import parse_target, plan_schedule_for_budget
        from ..checkpoints import read_checkpoint
        from ..planner.check import Candidate

        path = os.path.join(self.ipq_cfg.save_dir, PLAN_FILE)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if os.path.exists(path):
            logger.info("ipq: --ipq-target-size %s: the plan of the first run, %s", self.ipq_cfg.ipq_target_size, path)
            return path
        source = self.ipq_cfg.finetune_from_model
        if not source:
            raise ScheduleError(f"--ipq-target-size {self.ipq_cfg.ipq_target_size}: the plan is measured on the weights to compress: "
                                f"add --finetune-from-model DENSE.pt")
        if not distributed or torch.distributed.get_rank() == 0:
            start = time.perf_counter()
            state = read_checkpoint(source)
            model.load_state_dict(state["model"], strict=True, model_cfg=model_cfg)  # fairseq loads them again after this
            target = parse_target(self.ipq_cfg.ipq_target_size, dense_fp32_bytes(model))
            if "train" not in self.datasets:
                self.load_dataset("train", combine=False)
            # the run's own criterion: its config is the training config's (the task's is a node of it, as II() reads)
            criterion = self.build_criterion(self.ipq_cfg._get_root().criterion)
            batches = training_batches(self, model, min(8, max(1, self.ipq_cfg.ipq_calibration_batches)))
            candidates = [Candidate.from_file(p.strip()) for p in (self.ipq_cfg.ipq_candidates or "").split(",") if p.strip()]
            plan, text = plan_schedule_for_budget(
                model, state, batches, lambda sample: criterion(model, sample), target, updates=self.ipq_cfg.max_update or 500,
                title=f"Planned by --ipq-target-size {self.ipq_cfg.ipq_target_size} from {os.path.basename(source)}",
                candidates=candidates,
            )
            for line in plan.check_lines:
                logger.info("ipq: %s", line)
            os.makedirs(self.ipq_cfg.save_dir, exist_ok=True)
            with atomic_file(path) as tmp:
                tmp.write_text(text)
            logger.info("ipq: --ipq-target-size %s: planned %s, packed file %d bytes predicted for a target of %d, %.1f s",
                        self.ipq_cfg.ipq_target_size, path, plan.predicted_file_bytes, target, time.perf_counter() - start)
        if distributed:
            torch.distributed.barrier()
        return path

    @property
    def task_name(self) -> str:
        return getattr(self.ipq_cfg, "_name", None) or type(self).__name__

    def _check_run_flags(self) -> None:
        restore = self.ipq_cfg.restore_file
        if restore and restore != "checkpoint_last.pt" and not self.ipq_cfg.reset_optimizer:
            raise ScheduleError(
                f"--restore-file {restore}: its optimizer state does not cover the PQ centroids; add --reset-optimizer "
                f"--reset-dataloader --reset-meters --reset-lr-scheduler, or use --finetune-from-model {restore} (resumable)"
            )
        last = os.path.join(self.ipq_cfg.save_dir, "checkpoint_last.pt")
        if restore and restore != "checkpoint_last.pt" and os.path.exists(last):
            logger.warning("--restore-file %s restarts the schedule from scratch although %s exists; use --finetune-from-model to resume", restore, last)

    def _reject_foreign_quantization(self, model, state_dict, prefix, *args) -> None:
        """A --restore-file quantized by another schedule cannot be finetuned by this one."""
        modules = dict(model.named_modules(remove_duplicate=False))
        for key, value in state_dict.items():
            if key.endswith(".weight_int.codes"):  # int8/int4 layers come from `pack`, never from a schedule
                raise ScheduleError(f"checkpoint layer {key[:-len('.weight_int.codes')]} is scalar-quantized (a packed file?); start from the training checkpoint")
            if not key.endswith(".weight_pq.fitted") or not bool(value):
                continue
            name = key[len(prefix):-len(".weight_pq.fitted")]
            ours = provider_of(modules[name]) if name in modules else None
            theirs = state_dict.get(key[: -len("fitted")] + "centroids")
            if ours is None or theirs is None or tuple(theirs.shape) != tuple(ours.centroids.shape):
                raise ScheduleError(
                    f"checkpoint layer {name} is already quantized by another schedule ({'not in this one' if ours is None else 'other block size / centroids'}); "
                    f"start from the dense checkpoint"
                )

    # -- training -------------------------------------------------------------------------------

    def _calibration(self, model, criterion, plans) -> dict:
        """What the plans whose objective reads data fit with (weight name -> keyword arguments of fit_pq), from
        calibration batches run through the model as it is now (earlier stages quantized and finetuned): the same
        for a resumed run. ``activations``: per-weight error weights; ``output``: also the inputs' full second
        moments and the rows' weights (a weight no Linear uses keeps the activations objective, a weight the task's forward
        never runs, such as a classifier's masked-LM head, the weights objective)."""
        plans = [p for p in plans if p.objective in ("activations", "output")]
        if not plans:
            return {}
        if self.ipq_cfg.ipq_calibration_batches <= 0:
            raise ScheduleError(f"--ipq-calibration-batches {self.ipq_cfg.ipq_calibration_batches}: 'objective: {plans[0].objective}' needs at least 1")
        from fairseq import utils

        batches = training_batches(self, model, self.ipq_cfg.ipq_calibration_batches)
        if next(model.parameters()).is_cuda:
            batches = [utils.move_to_cuda(b) for b in batches]
        start = time.perf_counter()
        full = any(p.objective == "output" for p in plans)
        moments = collect_input_moments(model, {p.name: p.names for p in plans}, batches, lambda sample: criterion(model, sample), full=full)
        logger.info("ipq calibration: input statistics of %d weights over %d training batches, %.1f s", len(plans), len(batches), time.perf_counter() - start)
        fits = {}
        for plan in plans:
            stats = moments[plan.name]
            if not stats.reached():
                logger.info("ipq: %s saw no calibration input (this task's forward never runs it): its k-means keeps the weights objective", plan.name)
                continue
            fits[plan.name] = {"importance": stats.importance()}
            hessian = stats.output_hessian() if plan.objective == "output" else None
            if hessian is not None:
                fits[plan.name].update(hessian=hessian, row_weights=stats.row_weights())
            elif plan.objective == "output":
                logger.info("ipq: %s has no Linear use that saw calibration inputs: its k-means keeps the activations objective", plan.name)
        return fits

    def _advance_schedule(self, model, update_num: int, criterion=None) -> None:
        inner = unwrapped(model)
        self._reassign_codes(inner, update_num, criterion)
        for stage in self.ipq_plans:
            if stage.start_update > update_num:
                break
            todo = [p for p in stage.layers if not is_fitted(provider_of(inner.get_submodule(p.name)))]
            if not todo:
                continue
            if self.ipq_cfg.ipq_distill_weight > 0 and self.teacher is None:
                self.teacher = self._build_teacher(inner)
            start = time.perf_counter()
            fits = self._calibration(inner, criterion, todo)
            for plan in todo:
                fit = fits.get(plan.name, {})
                objective = fit_pq(inner, plan, self.ipq_schedule.kmeans_iterations, self.ipq_schedule.seed, self.ipq_cfg.ipq_kmeans_backend, **fit)
                used = "output" if "hessian" in fit else "activations" if "importance" in fit else "weights"  # what fitted it, fallbacks included
                logger.info("ipq stage %s: %s %s -> %d x %d centroids, k-means objective (%s) %.4g", stage.name, plan.name, plan.shape,
                            plan.n_centroids, plan.block_size, used, objective)
            seconds = time.perf_counter() - start
            compressed = sum(r.bytes for r in size_rows(inner))
            dense = dense_fp32_bytes(inner)
            logger.info(
                "ipq stage %d (%s) quantized at update %d: model %.3f MB (fp16 rest) vs %.3f MB fp32, x%.1f; k-means of %d "
                "weights %.1f s, process peak RSS %.2f GB",
                stage.index, stage.name, update_num, compressed / 1e6, dense / 1e6, dense / compressed, len(todo), seconds,
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            )

    def _reassign_codes(self, inner, update_num: int, criterion) -> None:
        """Codes that move (schedule key reassign_every): inside a stage's finetuning, every N updates, each block
        of its layers moves to the centroid nearest its fitted weight. Decided by the update number alone, so a
        resumed run reassigns at the same updates."""
        if getattr(self, "_reassigned_at", None) == update_num:
            return  # train_step runs once per micro-batch (--update-freq): reassign once per update
        self._reassigned_at = update_num
        for stage in self.ipq_plans:
            offset = update_num - stage.start_update
            every = stage.layers[0].reassign_every
            if not every or not 0 < offset < stage.updates or offset % every:
                continue
            start = time.perf_counter()
            fits = self._calibration(inner, criterion, stage.layers)
            for plan in stage.layers:
                moved, before, after = reassign_pq(inner, plan, fits.get(plan.name, {}).get("importance"))
                logger.info("ipq stage %s: %s codes reassigned at update %d: %.2f%% of blocks moved, %s error %.4g -> %.4g",
                            stage.name, plan.name, update_num, 100 * moved, plan.objective, before, after)
            logger.info("ipq stage %d (%s): codes of %d weights reassigned at update %d, %.1f s", stage.index, stage.name,
                        len(stage.layers), update_num, time.perf_counter() - start)

    def _check_ipq_flags(self) -> None:
        """The iPQ flags fairseq's parser cannot range-check, before any training."""
        from ..kmeans import BACKENDS

        cfg = self.ipq_cfg
        if cfg.ipq_kmeans_backend not in BACKENDS:
            raise ScheduleError(f"--ipq-kmeans-backend {cfg.ipq_kmeans_backend}: use {', '.join(BACKENDS)}")
        if not cfg.ipq_distill_weight >= 0:
            raise ScheduleError(f"--ipq-distill-weight {cfg.ipq_distill_weight}: must be >= 0 (0: no distillation)")
        if cfg.ipq_distill_teacher and not os.path.isfile(cfg.ipq_distill_teacher):
            raise ScheduleError(f"--ipq-distill-teacher {cfg.ipq_distill_teacher}: no such checkpoint file")

    def _build_teacher(self, model):
        if self.ipq_cfg.ipq_distill_teacher:
            from fairseq import checkpoint_utils

            models, _ = checkpoint_utils.load_model_ensemble([self.ipq_cfg.ipq_distill_teacher], task=None)
            teacher = models[0]
        elif any(is_fitted(provider_of(m)) for m in model.modules() if provider_of(m) is not None):
            raise ScheduleError("--ipq-distill-weight: the model is already partly quantized (resumed run); pass --ipq-distill-teacher DENSE.pt")
        else:  # a fresh dense model holding the weights as restored (nothing is quantized yet)
            teacher = super().build_model(self._model_cfg)
            dense_state = {k: v for k, v in model.state_dict().items() if not any(f".{c}." in k for c in PROVIDER_CHILDREN)}
            teacher.load_state_dict(dense_state)
            teacher.to(next(model.parameters()).device)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        self._advance_schedule(model, update_num, criterion)
        if self.ipq_cfg.ipq_distill_weight <= 0:
            return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
        model.train()
        model.set_num_updates(update_num)
        captured = {}
        inner = unwrapped(model)
        handle = inner.register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
        try:
            loss, sample_size, logging_output = criterion(model, sample)
        finally:
            handle.remove()
        with torch.no_grad():
            teacher_out = self._teacher_output(sample)
        distill = self._distill_loss(inner, captured["out"], teacher_out, sample)
        loss = loss + self.ipq_cfg.ipq_distill_weight * distill
        logging_output["distill"] = distill.item()
        if ignore_grad:
            loss *= 0
        optimizer.backward(loss)
        return loss, sample_size, logging_output

    def reduce_metrics(self, logging_outputs, criterion):
        """The distillation term in the logs ("distill", KL in bits per counted output), next to the criterion's loss."""
        super().reduce_metrics(logging_outputs, criterion)
        if any("distill" in log for log in logging_outputs):
            total = sum(log.get("distill", 0.0) for log in logging_outputs)
            size = sum(log.get("sample_size", 0) for log in logging_outputs)
            metrics.log_scalar("distill", total / max(size, 1) / math.log(2), size, round=4)

    def _teacher_output(self, sample):
        """The teacher's output for what the criterion asks of the student (overridden per task)."""
        return self.teacher(**sample["net_input"])

    def _distill_mask(self, sample):
        """Which outputs count in the distillation term: real target tokens (None: all of them)."""
        return sample["target"].ne(self.target_dictionary.pad()).unsqueeze(-1)

    def _distill_loss(self, model, student_out, teacher_out, sample):
        """Summed KL(teacher || student) over the outputs that count."""
        student = model.get_normalized_probs(student_out, log_probs=True)
        teacher = self.teacher.get_normalized_probs(teacher_out, log_probs=True)
        kl = F.kl_div(student, teacher, log_target=True, reduction="none")
        mask = self._distill_mask(sample)
        return (kl if mask is None else kl * mask).sum()


@dataclass
class IPQLanguageModelingConfig(LanguageModelingConfig, IPQOptions):
    pass


@register_task("ipq_language_modeling", dataclass=IPQLanguageModelingConfig)
class IPQLanguageModelingTask(IPQTaskMixin, LanguageModelingTask):
    def __init__(self, args, dictionary, output_dictionary=None, targets=None):
        super().__init__(args, dictionary, output_dictionary, targets)
        self._ipq_init(args)


@dataclass
class IPQTranslationConfig(TranslationConfig, IPQOptions):
    pass


@register_task("ipq_translation", dataclass=IPQTranslationConfig)
class IPQTranslationTask(IPQTaskMixin, TranslationTask):
    def __init__(self, cfg, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        self._ipq_init(cfg)


@dataclass
class IPQMaskedLMConfig(MaskedLMConfig, IPQOptions):
    pass


@register_task("ipq_masked_lm", dataclass=IPQMaskedLMConfig)
class IPQMaskedLMTask(IPQTaskMixin, MaskedLMTask):
    """iPQ of a RoBERTa-style encoder on its masked-LM objective."""

    def __init__(self, cfg, dictionary=None):
        super().__init__(cfg, dictionary)
        self._ipq_init(cfg)

    def _teacher_output(self, sample):  # the criterion projects the masked positions only
        return self.teacher(**sample["net_input"], masked_tokens=sample["target"].ne(self.source_dictionary.pad()))

    def _distill_mask(self, sample):
        return None


@dataclass
class IPQSentencePredictionConfig(SentencePredictionConfig, IPQOptions):
    pass


@register_task("ipq_sentence_prediction", dataclass=IPQSentencePredictionConfig)
class IPQSentencePredictionTask(IPQTaskMixin, SentencePredictionTask):
    """iPQ of a sentence(-pair) classifier, classification head included."""

    def __init__(self, cfg, data_dictionary, label_dictionary):
        super().__init__(cfg, data_dictionary, label_dictionary)
        self._ipq_init(cfg)

    def _teacher_output(self, sample):
        return self.teacher(**sample["net_input"], features_only=True, classification_head_name=self.cfg.classification_head_name)

    def _distill_mask(self, sample):
        return None
