"""Forwarding: instances newly stored here that match a ``[[forward]]`` rule are sent on to its destination.

The forwarder (:class:`~bastion.forward.forwarder.Forwarder`, one per node, in the server's primary process)
reads the index's change log only (it never touches the ingest path): it routes each stored instance by the
rules (:mod:`bastion.forward.rules`) into a durable queue per destination (:mod:`bastion.forward.queue`, in
``<data>/forward.sqlite3``), and sends each queue, with retries and a dead-letter list
(:mod:`bastion.forward.delivery`). ``bastion queue``, ``/api/queues`` and the admin page show and retry them.
"""

from pathlib import Path

from bastion.forward.queue import Backoff, ForwardQueue, QueueStats
from bastion.settings import Settings

#: The queue's file in the data directory.
QUEUE_FILE = "forward.sqlite3"


def queue_path(settings: Settings) -> Path:
    """Where the node's forwarding queue is kept."""
    return settings.data / QUEUE_FILE


def open_queue(settings: Settings) -> ForwardQueue:
    """The node's forwarding queue (``<data>/forward.sqlite3``, made if missing)."""
    from bastion.forward.sqlite import SqliteForwardQueue

    return SqliteForwardQueue(queue_path(settings))


def backoff_of(settings: Settings) -> Backoff:
    """The retry schedule the settings ask for."""
    return Backoff(settings.forward_max_attempts, settings.forward_backoff, settings.forward_backoff_max)


__all__ = ["QUEUE_FILE", "Backoff", "ForwardQueue", "QueueStats", "backoff_of", "open_queue", "queue_path"]
