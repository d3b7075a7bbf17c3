from . import qn_cross_entropy  # noqa: F401  (registration)
