from . import qn_roberta, qn_transformer, qn_transformer_lm  # noqa: F401  (registration)
