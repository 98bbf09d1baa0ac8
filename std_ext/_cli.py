"""Argument types shared by the ``std_ext`` commands (:mod:`std_ext.demo`, :mod:`std_ext.cli_generate`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= low``, else a message argparse prints with the option's name."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if number < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {number}")
        return number

    parse.__name__ = f"integer >= {low}"  # argparse names the type in some messages
    return parse
