from . import ipq  # noqa: F401  (registration)
