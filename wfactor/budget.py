"""The planner's budget: what factoring may spend, per tensor or for a whole family (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError

# Default budget, relative to each tensor's drift. To first order a rebuilt model's output divergence from
# the member is max_rel_error**2 times the member's divergence from the base, so 0.05 keeps cosine >= 0.999
# for any fine-tune whose outputs are within cosine 0.6 of its base. 0.1 (cosine 0.9) was the first choice;
# on the large bench family, whose full fine-tune sits at cosine 0.88 from its under-trained base, it gave
# 0.99891 and 0.05 gave 0.99945, for ~4% more bytes on the fixture family (bench/RESULTS.md has both sweeps).
DEFAULT_MAX_REL_ERROR = 0.05


@dataclass
class Budget:
    """What the planner may spend. ``max_rel_error`` bounds every tensor (relative to its drift).
    ``target_bytes`` / ``target_ratio`` (of the models side by side) bound the whole family instead: bytes
    go, across all members and tensors, where they buy the largest error reduction per byte."""

    lossless: bool = False
    max_rel_error: float = DEFAULT_MAX_REL_ERROR
    target_bytes: int | None = None
    target_ratio: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """A budget validates itself: an impossible one is refused when it is made (and by every command that
        takes one, in case it was changed since), with a one-line error."""
        if not self.lossless and not self.max_rel_error > 0:
            raise InputError(f"--max-rel-error must be > 0, found {self.max_rel_error}; use --lossless for exact")
        if self.target_bytes is not None and self.target_ratio is not None:
            raise InputError("give --target-bytes or --target-ratio, not both")
        if self.target_bytes is not None and self.target_bytes <= 0:
            raise InputError(f"--target-bytes must be > 0, found {self.target_bytes}")
        if self.target_ratio is not None and not 0 < self.target_ratio:
            raise InputError(f"--target-ratio must be > 0, found {self.target_ratio}")

    def check_per_member(self) -> None:
        """Refuse a whole-family budget where one member is factored alone (``wfactor add``)."""
        if self.target_bytes is not None or self.target_ratio is not None:
            raise InputError(
                "--target-bytes/--target-ratio budget a whole family; `add` factors one member against the "
                "existing backbone: use --max-rel-error E or --lossless"
            )

    @property
    def global_target(self) -> bool:
        return not self.lossless and (self.target_bytes is not None or self.target_ratio is not None)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"lossless": self.lossless, "max_rel_error": self.max_rel_error}
        if self.target_bytes is not None:
            out["target_bytes"] = self.target_bytes
        if self.target_ratio is not None:
            out["target_ratio"] = self.target_ratio
        return out
