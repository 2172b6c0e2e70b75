"""The index: a rebuildable cache of what the blob store holds, for fast queries.

Every backend implements :class:`bastion.index.base.Index`.
"""

from bastion.index.base import Change, Index, LogPosition, LogRead, Statistics, log_floor, open_index

__all__ = ["Change", "Index", "LogPosition", "LogRead", "Statistics", "log_floor", "open_index"]
