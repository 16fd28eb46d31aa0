"""The one error `student eval` stops on before writing anything: exit status 2, one line."""

from __future__ import annotations


class EvalError(Exception):
    """The eval cannot run as asked (bad flag or eval set, unreachable target); the message is one
    line saying what to fix."""
