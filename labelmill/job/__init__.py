"""The job: its states, spec, counts and enqueue position, and the ledger in Redis.

Nothing outside this package names a key or field of the ledger.
"""

from labelmill.job.ledger import Ledger
from labelmill.job.model import Batch, BatchStart, JobCounts, JobSpec, JobState, Position

__all__ = ["Batch", "BatchStart", "JobCounts", "JobSpec", "JobState", "Ledger", "Position"]
