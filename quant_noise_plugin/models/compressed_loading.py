"""What makes a plugin architecture reload compressed checkpoints with stock fairseq tools."""
from ..compressed import attach_from_state_dict
from ..errors import _checkpoint_arg
from ..inference import prepare_inference
from ..integrity import looks_packed, notice_unverified, pop_and_verify


class CompressedLoadingMixin:
    """Rebuild compressed layers from the checkpoint's own keys before loading it.

    fairseq-eval-lm / fairseq-generate / the hub build the model from its config (dense), then
    call ``model.load_state_dict``; here, layers stored as PQ codes or int codes get their
    provider first (and drop their dense Parameter), so the strict load matches.  During iPQ
    training (``ipq_training``) the task has attached the schedule's codebooks itself and checks
    the checkpoint against them, so nothing is inferred. A packed file's (or a plugin training checkpoint's) checksums are verified first
    (integrity.py): a corrupted tensor is a one-line error, never a model that runs. After loading, int8-input layers choose
    their compute on this machine and one log line says what runs (inference.py).
    """

    ipq_training = False

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        source = _checkpoint_arg()
        verified = pop_and_verify(state_dict, source)  # packed files, and training checkpoints of plugin archs
        if not self.ipq_training:
            if verified is None and looks_packed(state_dict):
                notice_unverified(source)
            attach_from_state_dict(self, state_dict, free_dense=True)
        result = super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)
        if not self.ipq_training:
            prepare_inference(self)
        return result
