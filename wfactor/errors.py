"""One exception hierarchy. Every error the library raises on purpose is a WfactorError.

Each subclass carries a stable ``code`` that spec/FORMAT.md lists (section "Error codes"); the CLI prints
``error[code]: message`` on one line and exits with ``exit_code``.
"""

from __future__ import annotations


class WfactorError(Exception):
    """Base of every error wfactor raises on purpose.

    ``message`` is the one line the CLI prints. The structured fields, when the raiser knows them, say the
    same for programs: ``path`` (the file), ``tensor``, ``expected`` and ``found``, and ``hint`` (what to do
    next); a raiser that has them and no message of its own gets one composed from them. The exception that
    led to this one, if any, is chained (``raise ... from exc``: ``__cause__``) and shown by ``to_json``."""

    code = "error"
    exit_code = 2

    def __init__(
        self,
        message: str = "",
        *,
        path: str | None = None,
        tensor: str | None = None,
        expected: str | None = None,
        found: str | None = None,
        hint: str | None = None,
    ) -> None:
        if not message:
            parts = [str(path) if path else "", f"tensor {tensor!r}" if tensor else ""]
            what = ": ".join(p for p in parts if p)
            said = (f"expected {expected}" if expected else "", f"found {found}" if found else "")
            detail = ", ".join(x for x in said if x)
            message = "; ".join(x for x in (": ".join(x for x in (what, detail) if x), hint or "") if x)
        super().__init__(message)
        self.message = message
        self.path, self.tensor, self.expected, self.found, self.hint = path, tensor, expected, found, hint

    def __str__(self) -> str:
        return self.message

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"code": self.code, "exit_code": self.exit_code, "message": self.message}
        for k in ("path", "tensor", "expected", "found", "hint"):
            if getattr(self, k) is not None:
                out[k] = str(getattr(self, k))
        if self.__cause__ is not None:
            out["cause"] = f"{type(self.__cause__).__name__}: {self.__cause__}"
        return out


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


class FileIOError(WfactorError):
    """The operating system failed a read or a write (disk full, permission denied, a device error): not the
    input's fault, so it has an exit code of its own."""

    code = "io"
    exit_code = 3

    @classmethod
    def of(cls, exc: OSError) -> FileIOError:
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        err = cls(f"{where}{exc.strerror or exc}", path=str(exc.filename) if exc.filename else None)
        err.__cause__ = exc
        return err


class UnsupportedDtypeError(WfactorError):
    """A tensor's dtype is valid safetensors but not one this version of wfactor reads."""

    code = "unsupported_dtype"


class DependencyError(WfactorError):
    """An optional dependency that the requested work needs is not installed."""

    code = "dependency"


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
        FileIOError,
        UnsupportedDtypeError,
        DependencyError,
    )
}
