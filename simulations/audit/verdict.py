"""What every audit check returns: a verdict an auditor can act on, and why."""

from __future__ import annotations

from dataclasses import dataclass, field

PASS, FAIL, INCONCLUSIVE, NOT_APPLICABLE = "pass", "fail", "inconclusive", "not applicable"
MAX_LISTED = 20  # violations listed in the report per check


@dataclass
class CheckResult:
    key: str
    title: str
    verdict: str
    reason: str
    details: dict = field(default_factory=dict)
    seconds: float = 0.0
