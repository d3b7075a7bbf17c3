"""Criterions that give Quant-Noise to any architecture: ``--criterion qn_cross_entropy`` (and
``qn_label_smoothed_cross_entropy``, ``qn_masked_lm``, ``qn_sentence_prediction``).

The loss is fairseq's; the only addition is attaching the noise to the model on the first
training forward (criterions are built after the model and never see it before).
"""

from dataclasses import dataclass

from fairseq.criterions import register_criterion
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.criterions.cross_entropy import CrossEntropyCriterion, CrossEntropyCriterionConfig
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.criterions.masked_lm import MaskedLmConfig, MaskedLmLoss
from fairseq.criterions.sentence_prediction import SentencePredictionConfig, SentencePredictionCriterion

from ..fairseq_options import CRITERION_PREFIX, CriterionNoiseOptions, add_criterion_noise_args
from ..quant_noise import QuantNoiseConfig, apply_quant_noise_
from ..weight_swap import weight_fns


class QuantNoiseCriterionMixin:
    """Attaches Quant-Noise to whatever model the criterion is first called with in training."""

    @classmethod
    def build_criterion(cls, cfg, task):
        criterion = super().build_criterion(cfg, task)  # the loss' own arguments, as fairseq does
        criterion.noise_config = QuantNoiseConfig.from_fairseq_cfg(cfg, CRITERION_PREFIX)
        criterion._noised_model_ids = set()
        return criterion

    @classmethod
    def add_args(cls, parser):
        gen_parser_from_dataclass(parser, cls.loss_config())
        add_criterion_noise_args(parser)

    def forward(self, model, sample, reduce=True):
        self._ensure_noise(model)
        return super().forward(model, sample, reduce)

    def _ensure_noise(self, model) -> None:
        if not model.training or id(model) in self._noised_model_ids:
            return
        self._noised_model_ids.add(id(model))
        if any(weight_fns(m) for m in model.modules()):  # a qn_* architecture noised itself at build
            return
        apply_quant_noise_(model, self.noise_config)


@dataclass
class QNCrossEntropyConfig(CrossEntropyCriterionConfig, CriterionNoiseOptions):
    pass


@register_criterion("qn_cross_entropy", dataclass=QNCrossEntropyConfig)
class QNCrossEntropyCriterion(QuantNoiseCriterionMixin, CrossEntropyCriterion):
    loss_config = CrossEntropyCriterionConfig


@dataclass
class QNLabelSmoothedCrossEntropyConfig(LabelSmoothedCrossEntropyCriterionConfig, CriterionNoiseOptions):
    pass


@register_criterion("qn_label_smoothed_cross_entropy", dataclass=QNLabelSmoothedCrossEntropyConfig)
class QNLabelSmoothedCrossEntropyCriterion(QuantNoiseCriterionMixin, LabelSmoothedCrossEntropyCriterion):
    loss_config = LabelSmoothedCrossEntropyCriterionConfig


@dataclass
class QNMaskedLmConfig(MaskedLmConfig, CriterionNoiseOptions):
    pass


@register_criterion("qn_masked_lm", dataclass=QNMaskedLmConfig)
class QNMaskedLmLoss(QuantNoiseCriterionMixin, MaskedLmLoss):
    loss_config = MaskedLmConfig


@dataclass
class QNSentencePredictionConfig(SentencePredictionConfig, CriterionNoiseOptions):
    pass


@register_criterion("qn_sentence_prediction", dataclass=QNSentencePredictionConfig)
class QNSentencePredictionCriterion(QuantNoiseCriterionMixin, SentencePredictionCriterion):
    loss_config = SentencePredictionConfig
