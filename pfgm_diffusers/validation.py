"""The checks of user input shared by the schedulers, the pipeline and the kernel: one wording, one rule each.

Each raises a `ValueError` that names the argument, the value and what is allowed. Integers accept NumPy integers
(a step count from `np.arange` is an integer) and refuse `bool` (an `int` subclass, never meant as a count).
"""

import math

import numpy as np


def is_integer(value) -> bool:
    """Whether `value` is an integer (Python or NumPy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_integer(name: str, value, minimum: int = 1, maximum: int | None = None) -> int:
    """`value` as an `int` if it is an integer in [minimum, maximum], else a `ValueError`."""
    if not is_integer(value) or value < minimum or (maximum is not None and value > maximum):
        allowed = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
    return int(value)


def check_number(name: str, value, optional: bool = False) -> None:
    """Refuse a value that is not a finite real number (NaN and inf pass `<` checks and fail later)."""
    if optional and value is None:
        return
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        finite = False
    else:
        finite = math.isfinite(value)
    if not finite:
        raise ValueError(f"`{name}` must be a finite number{' or None' if optional else ''}, got {value!r}.")


def check_aug_dim(aug_dim) -> None:
    """D: an integer >= 1, or None for D = infinity."""
    if aug_dim is not None and (not is_integer(aug_dim) or aug_dim < 1):
        raise ValueError(f"`aug_dim` must be an integer >= 1 or None (D = infinity), got {aug_dim!r}.")


def check_choice(name: str, value, choices) -> None:
    """Refuse a name that is not one of `choices`."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {value!r}.")


def check_generators(generator, batch_size: int) -> None:
    """A list of generators has one per image (image i from generator i); a single generator or None serves all."""
    if isinstance(generator, list) and len(generator) != batch_size:
        raise ValueError(
            f"You passed a list of {len(generator)} generators for a batch of {batch_size}: pass one generator "
            "per image (or a single generator)."
        )


def batch_size_of(batch_size: int, sources: dict) -> int:
    """The batch of a call: that of every given tensor in `sources` (which must agree), with `batch_size` 1 or equal
    to it; `batch_size` itself when no tensor is given."""
    sizes = {name: value.shape[0] for name, value in sources.items() if value is not None and value.ndim > 0}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"The batch sizes of {', '.join(f'{k} ({v})' for k, v in sizes.items())} must be equal.")
    if not sizes:
        return batch_size
    (name, size), *_ = sizes.items()
    if batch_size not in (1, size):
        raise ValueError(f"batch_size={batch_size} does not match {name} of batch {size}.")
    return size
