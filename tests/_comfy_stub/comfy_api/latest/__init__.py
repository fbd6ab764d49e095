"""Test-only stand-in of ``comfy_api.latest`` (see ../README.md)."""
from __future__ import annotations

from abc import ABC, abstractmethod

from . import io, ui  # noqa: F401


class ComfyExtension(ABC):
    async def on_load(self) -> None:
        return None

    @abstractmethod
    async def get_node_list(self) -> list:
        ...
