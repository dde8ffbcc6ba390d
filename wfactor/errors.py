"""One exception hierarchy. Every error the library raises on purpose is a WfactorError.

Each subclass carries a stable ``code`` that spec/FORMAT.md lists (section "Error codes"); the CLI prints
``error[code]: message`` on one line and exits with ``exit_code``.
"""

from __future__ import annotations


class WfactorError(Exception):
    """Base of every error wfactor raises on purpose."""

    code = "error"
    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InputError(WfactorError):
    """A user-supplied argument or input model is unusable (missing path, bad name, conflicting options)."""

    code = "input"


class NotFoundError(InputError):
    """A path, member or tensor that was asked for does not exist."""

    code = "not_found"


class MapError(InputError):
    """A ``--map`` alignment rule is malformed, maps nothing, or maps a tensor onto one that cannot predict it."""

    code = "map"


class NotSafetensorsError(WfactorError):
    """A file that must be safetensors is not (bad length prefix, header is not JSON, ...)."""

    code = "not_safetensors"


class FormatError(WfactorError):
    """A family, manifest or delta file breaks a rule of spec/FORMAT.md."""

    code = "format"


class LimitError(FormatError):
    """A file exceeds one of the numeric limits of spec/FORMAT.md."""

    code = "limit"


class VersionError(FormatError):
    """A file was written by a newer format version than this reader supports."""

    code = "version"


class CodecError(FormatError):
    """A codec record is inconsistent (unknown codec, parameters that disagree with shapes, bad parts)."""

    code = "codec"


class IntegrityError(WfactorError):
    """A file's size or sha256 differs from what the manifest records."""

    code = "integrity"
    exit_code = 1


class BackboneMismatchError(IntegrityError):
    """A delta was opened against a backbone other than the one it was written for."""

    code = "backbone_mismatch"


class MemoryLimitError(WfactorError):
    """Not enough memory to hold a tensor (the file's declarations are within the spec's limits)."""

    code = "memory"


def is_allocation_failure(exc: BaseException) -> bool:
    """A failed allocation: Python's MemoryError, or torch's out-of-memory errors (CPU and CUDA)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text or "Out of memory" in text
    )


class VerifyError(WfactorError):
    """A rebuilt member differs from its original by more than the recorded budget."""

    code = "verify_failed"
    exit_code = 1


ERROR_CODES: dict[str, type[WfactorError]] = {
    cls.code: cls
    for cls in (
        WfactorError,
        InputError,
        NotFoundError,
        MapError,
        NotSafetensorsError,
        FormatError,
        LimitError,
        VersionError,
        CodecError,
        IntegrityError,
        BackboneMismatchError,
        VerifyError,
        MemoryLimitError,
    )
}
