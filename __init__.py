"""GenRefocus: ComfyUI entry point.

Guarded: outside ComfyUI (scripts, tests, the CLI) importing this package registers nothing; inside
ComfyUI, which imports this folder as a package, it exposes one V3 ``ComfyExtension`` through
``comfy_entrypoint``.
"""

# Frontend extensions (click-to-focus on the Focus Point node). ComfyUI reads this module attribute
# for V1 and V3 packs alike and serves every .js under it at /extensions/<folder name>/; outside
# ComfyUI it is an unused string.
WEB_DIRECTORY = "./web"

try:
    from comfy_api.latest import ComfyExtension
except ImportError:  # not running inside ComfyUI
    ComfyExtension = None

# Only a package import (what ComfyUI does) registers nodes; a bare-module import of this file, as
# test runners may do for a folder's __init__.py, has no package to import the nodes from.
if ComfyExtension is not None and __package__:
    from .nodes import NODES

    class GenRefocusExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODES)

    async def comfy_entrypoint() -> ComfyExtension:
        return GenRefocusExtension()
