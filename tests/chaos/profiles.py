"""How big and how long a run is: the full profile (`make chaos`), the short one (`make test`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# Fixed for every profile.
ERROR_RATE = 0.2  # share of REST calls answered with a 5xx during an error burst
LOST_ANSWER_RATE = 0.1  # share of writes done, then answered too late for the client
# The client gives up before the emulator answers a held write: that answer is lost to it.
CLIENT_TIMEOUT_S = 5.0
HELD_ANSWER_S = 10.0
# The target: every user converged within this long of the portal coming back.
CONVERGENCE_TARGET_S = 60.0


@dataclass(frozen=True)
class Profile:
    name: str
    users: int
    # Updates and moves per second, spread over the users, for the whole fault schedule.
    changes_per_s: float
    # Times each kind of fault is injected.
    rounds: int
    portal_outage_s: float
    # Beyond every retry window: the jobs' own (3 attempts, 2 s and 4 s apart) and Core's first
    # retries (30 s, doubling), so that only Core's retries and probes bring the users back.
    long_outage_s: float
    error_burst_s: float
    lost_answers_s: float
    # How long a stopped process or service stays down before it is started again.
    down_s: float
    # After a fault ends: wait for the changes made until then to be synced, at most
    # settle_max_s, then a calm gap_s before the next fault.
    settle_max_s: float
    gap_s: float
    # At the end: poll until every count is 0, giving up after final_max_s, or earlier when
    # nothing improved for final_stall_s.
    final_max_s: float
    final_stall_s: float

    def describe(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "error_rate": ERROR_RATE,
            "lost_answer_rate": LOST_ANSWER_RATE,
            "client_timeout_s": CLIENT_TIMEOUT_S,
            "held_answer_s": HELD_ANSWER_S,
            "convergence_target_s": CONVERGENCE_TARGET_S,
        }


FULL = Profile(
    name="full",
    users=2000,
    changes_per_s=10.0,
    rounds=3,
    portal_outage_s=30.0,
    long_outage_s=300.0,
    error_burst_s=60.0,
    lost_answers_s=60.0,
    down_s=5.0,
    settle_max_s=120.0,
    gap_s=15.0,
    final_max_s=900.0,
    final_stall_s=300.0,
)

# Every fault once. The long outage is scaled from 5 minutes to 60 s: still beyond the jobs'
# retry window and Core's first retry, so the recovery takes the same path.
SHORT = Profile(
    name="short",
    users=100,
    changes_per_s=3.0,
    rounds=1,
    portal_outage_s=30.0,
    long_outage_s=60.0,
    error_burst_s=30.0,
    lost_answers_s=30.0,
    down_s=2.0,
    settle_max_s=20.0,
    gap_s=3.0,
    final_max_s=240.0,
    final_stall_s=120.0,
)

PROFILES = {profile.name: profile for profile in (FULL, SHORT)}
