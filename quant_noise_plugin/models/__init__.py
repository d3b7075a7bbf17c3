from . import qn_transformer_lm, qn_transformer  # noqa: F401  (registration)
