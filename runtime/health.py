"""What went wrong with which stack: per-call failures and the quarantine of stacks that keep failing.

A stack that fails in a call (raises, returns NaN/Inf or the wrong shape, exceeds its timeout, or has members whose
outputs are outliers) is dropped for that call only (an outlier: only those members). After ``quarantine_after``
consecutive failed calls it is quarantined: budgets stop planning it until :meth:`edgens.runtime.Predictor.retry`
puts it back. An outlier is evidence about the call's inputs as much as about the stack, so the stack reruns its
self-test at once: if its outputs on the stored inputs changed, it is quarantined at once; if not, the call counts
as cleared, not toward quarantine (a bundle without self-test data keeps the count of failed calls). A stack whose
outputs changed in the self-test is quarantined at once (``retry`` loads it again from its file). A stack whose
file is missing or corrupt, or that cannot be loaded, is excluded from the start (``retry`` checks it again too).
"""

from __future__ import annotations

from dataclasses import dataclass

# Why a stack failed in one call ("outlier": it answered, but some of its members deviated from the others beyond
# their thresholds, a silent fault; those members were left out).
FAILURE_KINDS = ("error", "non-finite", "shape", "timeout", "busy", "outlier", "checksum", "self-test")
# Silent-fault signals: they say the stack's answer looked wrong for this call's inputs (an outlier may be the
# inputs' doing; a checksum should not be, but is held to the same rule). They quarantine a stack only when its own
# self-test confirms them (Predictor: quarantine on evidence).
SILENT_KINDS = ("outlier", "checksum")
# A stack's standing: planned, excluded at load, or quarantined after repeated failures.
STATUSES = ("ok", "excluded", "quarantined")


@dataclass(frozen=True)
class StackFailure:
    """One stack failing in one call.

    Attributes:
        stack: the stack's name.
        kind: ``error`` (it raised), ``non-finite`` (NaN/Inf in its output), ``shape`` (wrong output shape),
            ``timeout`` (slower than the stack timeout), ``busy`` (still running after an earlier timeout),
            ``outlier`` (members deviating from the others beyond their thresholds: a silent fault), ``checksum``
            (the checksums inside its graph do not hold: a silent fault, the message names the layer) or
            ``self-test`` (its outputs on the stored inputs changed, or its checksums failed on them).
        message: what happened.
    """

    stack: str
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.stack} ({self.kind}: {self.message})"


@dataclass
class StackHealth:
    """A stack's standing over the predictor's life.

    Attributes:
        name: the stack's name.
        status: ``ok``, ``excluded`` or ``quarantined``.
        reason: why it is excluded or quarantined.
        calls: calls that ran it.
        failures: calls in which it failed.
        consecutive_failures: failed calls since its last success.
        cleared: calls in which it was left out as an outlier but then passed its self-test (the call's inputs, not
            the stack, were odd); they do not count toward quarantine.
    """

    name: str
    status: str = "ok"
    reason: str | None = None
    calls: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    cleared: int = 0

    def succeeded(self) -> None:
        """Record a successful call."""
        self.calls += 1
        self.consecutive_failures = 0

    def cleared_by_self_test(self) -> None:
        """Record a call in which it was an outlier but its self-test then passed."""
        self.calls += 1
        self.failures += 1
        self.cleared += 1

    def failed(self, failure: StackFailure, quarantine_after: int | None) -> bool:
        """Record a failed call; returns True if this failure puts the stack in quarantine."""
        self.calls += 1
        self.failures += 1
        self.consecutive_failures += 1
        if quarantine_after and self.consecutive_failures >= quarantine_after and self.status == "ok":
            self.status = "quarantined"
            self.reason = f"failed {self.consecutive_failures} calls in a row; last: {failure.kind}: {failure.message}"
            return True
        return False
