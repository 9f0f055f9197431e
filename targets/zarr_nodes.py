"""Typed access to a Zarr group's members: an array where an array must be, a group where a group must be,
a dict where an attribute holds one, and a clear error naming the path when the store holds another kind."""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from cae2.errors import UserError


def _member(group: zarr.Group, name: str, kind: type, other: str) -> Any:
    node = group[name]
    if not isinstance(node, kind):
        raise UserError(f"{group.store}: {group.path}/{name} is {other} where a cae2 store has "
                        f"{'an array' if kind is zarr.Array else 'a group'}; the store is damaged: rerun the command "
                        "that wrote it")
    return node


def array(group: zarr.Group, name: str) -> zarr.Array:
    return _member(group, name, zarr.Array, "a group")


def optional_array(group: zarr.Group, name: str) -> zarr.Array | None:
    return array(group, name) if name in group else None


def subgroup(group: zarr.Group, name: str) -> zarr.Group:
    return _member(group, name, zarr.Group, "an array")


def values(group: zarr.Group, name: str) -> np.ndarray:
    """The whole array `name` of `group` in memory."""
    return np.asarray(array(group, name)[...])


def record(group: zarr.Group, key: str) -> dict[str, Any] | None:
    """The attribute `key` of `group` when it holds a JSON object; None when it is absent or holds another value."""
    value = group.attrs.get(key)
    return dict(value) if isinstance(value, dict) else None
