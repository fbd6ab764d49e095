"""Test-only stand-in of ``comfy_api.latest.ui`` (keeps the images instead of saving them)."""
from __future__ import annotations


class PreviewImage:
    def __init__(self, image, animated: bool = False, cls=None, **kwargs):
        self.image, self.animated, self.cls = image, animated, cls

    def as_dict(self):
        return {"images": [{"shape": list(self.image.shape)}], "animated": (self.animated,)}
