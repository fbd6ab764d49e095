"""GenRefocus: ComfyUI entry point.

Guarded: outside ComfyUI (scripts, tests, the CLI) importing this package registers nothing; inside
ComfyUI it exposes one V3 ``ComfyExtension`` through ``comfy_entrypoint``.
"""

try:
    from comfy_api.latest import ComfyExtension
except ImportError:  # not running inside ComfyUI
    pass
else:
    from .nodes import NODES

    class GenRefocusExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODES)

    async def comfy_entrypoint() -> ComfyExtension:
        return GenRefocusExtension()
