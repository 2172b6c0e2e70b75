"""Work that outlives a request, as leased jobs in the database (:mod:`bastion.jobs.base`)."""

from bastion.jobs.base import LEASE_SECONDS, Job, Jobs
from bastion.settings import Settings


def open_jobs(settings: Settings, lease_seconds: float = LEASE_SECONDS) -> Jobs:
    """The archive's jobs: in the index's PostgreSQL database and schema where the index is there (shared by the
    nodes), else in ``<data>/jobs.sqlite3`` (one node; never in the index file, which is a rebuildable cache)."""
    from bastion.index.base import is_postgresql

    if is_postgresql(settings.index_location):
        from bastion.jobs.postgresql import PostgresJobs

        return PostgresJobs(settings.index_location, lease_seconds)
    from bastion.jobs.sqlite import SqliteJobs

    return SqliteJobs(settings.data / "jobs.sqlite3", lease_seconds)


__all__ = ["LEASE_SECONDS", "Job", "Jobs", "open_jobs"]
