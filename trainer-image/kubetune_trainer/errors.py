"""Failures the trainer reports, each with the exit code the operator acts on."""

from __future__ import annotations

from kubetune.api import ExitCode


class TrainerError(Exception):
    """A failure with a one-line message for people and an exit code for the Job controller."""

    exit_code = ExitCode.RUNTIME_ERROR


class SpecError(TrainerError):
    """The config cannot work (e.g. a model that does not exist); retrying will not help."""

    exit_code = ExitCode.INVALID_SPEC


class DataError(TrainerError):
    """The dataset is unreadable, malformed or empty after cleaning; retrying will not help."""

    exit_code = ExitCode.DATA_ERROR


class DivergedError(TrainerError):
    """The training loss became NaN or infinite; the same settings would diverge again."""

    exit_code = ExitCode.DIVERGED


def first_line(exc: BaseException) -> str:
    """An exception's first line, for a one-line message; its type's name when it has none."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
