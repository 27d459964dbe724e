"""One home for the library's argument rules; every message names the argument.

The command line maps argument names to its options; it never rewrites these
messages.
"""

from __future__ import annotations

import numpy as np


def check_int(name: str, value, minimum: int, *, bound: str = "", context: str = "") -> None:
    """``value`` must be an integer (a Python or numpy int, not a bool) ``>= minimum``.

    Args:
        name: the argument's name, first in the message.
        value: what was given.
        minimum: the smallest allowed value.
        bound: how the message names ``minimum`` when it comes from another
            argument (``"k1 = 3"``); default: the number itself.
        context: words appended after the bound (``" for ProjectedLSTM"``).

    Raises:
        ValueError: ``"{name} must be an integer >= {bound}{context}, got {value!r}"``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {bound or minimum}{context}, "
                         f"got {value!r}")


def check_forget_bias(forget_bias, bias: bool, what: str) -> None:
    """``forget_bias`` initialises a bias, so it needs ``bias=True``.

    Args:
        forget_bias: the value given (0 or None: nothing to check).
        bias: whether the cell has biases.
        what: the bias it initialises, for the message (``"b_ih"``).

    Raises:
        ValueError: naming ``forget_bias`` and ``bias``.
    """
    if forget_bias and not bias:
        raise ValueError(f"forget_bias={forget_bias!r} needs bias=True: it initialises {what}")
