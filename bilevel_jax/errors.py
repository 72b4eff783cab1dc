"""Exceptions raised by bilevel_jax.

Every error the library raises on bad input derives from `BilevelJaxError`, and the
input-validation errors also derive from `ValueError`, so `except ValueError` keeps working.
"""


class BilevelJaxError(Exception):
    """Base class of every bilevel_jax error."""


class InvalidMDPError(BilevelJaxError, ValueError):
    """An MDP (or one of its fields) is malformed: wrong shape, bad probabilities, bad discount."""


class InvalidArgumentError(BilevelJaxError, ValueError):
    """An argument other than the MDP is out of range (temperature, sizes, solver options)."""
