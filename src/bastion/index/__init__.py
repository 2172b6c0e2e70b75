"""The index: a rebuildable cache of what the blob store holds, for fast queries.

Every backend implements :class:`bastion.index.base.Index`.
"""

from bastion.index.base import Change, Index, Statistics, open_index

__all__ = ["Change", "Index", "Statistics", "open_index"]
