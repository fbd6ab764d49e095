"""Build the shipped workflows (UI format, ``workflows/*.json``) and their API-format twins
(``tests/data/*.api.json``) from one description, so the two can never drift.

Run from the repo root: ``python tests/data/build_workflows.py``. Widget order follows each
node's schema (``tests/data/schemas.json`` for ours).
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = json.loads((REPO / "tests" / "data" / "schemas.json").read_text())

# Core nodes we use: (input sockets, output sockets, widget names in order).
CORE = {
    "LoadImage": ([], [("IMAGE", "IMAGE"), ("MASK", "MASK")], ["image", "upload"]),
    "SaveImage": ([("images", "IMAGE")], [], ["filename_prefix"]),
    "PreviewImage": ([("images", "IMAGE")], [], []),
    "Note": ([], [], ["text"]),
    "UNETLoader": ([], [("MODEL", "MODEL")], ["unet_name", "weight_dtype"]),
    "VAELoader": ([], [("VAE", "VAE")], ["vae_name"]),
}
WIDGET_TYPES = {"INT", "FLOAT", "BOOLEAN", "STRING", "COMBO"}


def _sockets(node_type: str):
    if node_type in CORE:
        ins, outs, widgets = CORE[node_type]
        return ins, outs, widgets
    s = SCHEMAS[node_type]
    ins = [(i["id"], i["type"]) for i in s["inputs"] if i["type"] not in WIDGET_TYPES]
    outs = [(t, t) for t in s["outputs"]]
    widgets = [i["id"] for i in s["inputs"] if i["type"] in WIDGET_TYPES]
    return ins, outs, widgets


def _ui_inputs(node_type: str, linked: set[str]) -> list[tuple[str, str, bool]]:
    """UI input slots: the sockets, then the widgets that a link drives (widget-as-input, e.g. a
    FLOAT output into the Defocus Map's k): ``(name, type, is_widget)``."""
    ins, _, widgets = _sockets(node_type)
    slots = [(name, typ, False) for name, typ in ins]
    if node_type not in CORE:
        types = {i["id"]: i["type"] for i in SCHEMAS[node_type]["inputs"]}
        slots += [(w, types[w], True) for w in widgets if w in linked]
    return slots


def build(name: str, nodes: list[dict], links: list[tuple[int, int, int, str]]) -> None:
    """nodes: {id, type, pos, widgets: {name: value}, title?, size?}; links: (from, slot, to, input)."""
    by_id = {n["id"]: n for n in nodes}
    ui_nodes, ui_links, api = [], [], {}
    slots = {n["id"]: _ui_inputs(n["type"], {lk[3] for lk in links if lk[2] == n["id"]}) for n in nodes}
    for lid, (src, slot, dst, inp) in enumerate(links, start=1):
        ui_links.append(
            [
                lid,
                src,
                slot,
                dst,
                [i for i, _, _ in slots[dst]].index(inp),
                _sockets(by_id[src]["type"])[1][slot][1],
            ]
        )
    for order, n in enumerate(nodes):
        _, outs, widgets = _sockets(n["type"])
        wv = [n["widgets"][w] for w in widgets if w in n["widgets"]]
        ui_inputs = []
        for iname, itype, is_widget in slots[n["id"]]:
            link = next((lk[0] for lk in ui_links if lk[3] == n["id"] and slots[n["id"]][lk[4]][0] == iname),
                        None)
            entry = {"name": iname, "type": itype, "link": link}
            if is_widget:
                entry["widget"] = {"name": iname}
            ui_inputs.append(entry)
        ui_outputs = []
        for oslot, (oname, otype) in enumerate(outs):
            ol = [lk[0] for lk in ui_links if lk[1] == n["id"] and lk[2] == oslot]
            ui_outputs.append({"name": oname, "type": otype, "links": ol, "slot_index": oslot})
        node = {
            "id": n["id"],
            "type": n["type"],
            "pos": n["pos"],
            "size": n.get("size", [320, 160]),
            "flags": {},
            "order": order,
            "mode": 0,
            "inputs": ui_inputs,
            "outputs": ui_outputs,
            "properties": {"Node name for S&R": n["type"]},
            "widgets_values": wv,
        }
        if "title" in n:
            node["title"] = n["title"]
        if n["type"] == "Note":
            node["color"], node["bgcolor"] = "#432", "#653"
        ui_nodes.append(node)
        if n["type"] == "Note":
            continue
        inputs = {w: n["widgets"][w] for w in widgets if w in n["widgets"] and w != "upload"}
        for src, slot, dst, inp in links:
            if dst == n["id"]:
                inputs[inp] = [str(src), slot]
        api[str(n["id"])] = {
            "class_type": n["type"],
            "inputs": inputs,
            "_meta": {"title": n.get("title", n["type"])},
        }
    ui = {
        "last_node_id": max(by_id),
        "last_link_id": len(ui_links),
        "nodes": ui_nodes,
        "links": ui_links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
        "version": 0.4,
    }
    (REPO / "workflows" / f"{name}.json").write_text(json.dumps(ui, indent=1) + "\n")
    (REPO / "tests" / "data" / f"{name}.api.json").write_text(json.dumps(api, indent=1) + "\n")


CLASSICAL_NOTE = """GenRefocus - classical refocus (no model files needed)

Inputs:
1. Load Image (photo): an all-in-focus photo.
2. Load Image (depth): its grey depth map, same size, near = bright (the usual output of depth nodes
   such as Depth Anything). For metric depth in metres choose interpretation 'metric_depth'; if near
   is dark, use 'relative_depth' or 'invert'. Never use a colour-mapped depth preview.
   To try it without files: run  python -m genrefocus_core demo -o <ComfyUI>/input  in this pack's
   folder and pick demo_input.png and demo_disparity.png.
3. Focus Point: x, y as fractions of the width and height (0.5, 0.5 = centre); after a run the
   node shows the photo with the point marked. Or wire a mask into 'Focus from Mask' instead.
4. Defocus Map: K = blur strength (largest blur radius in px for relative maps; px*m for metric).
5. Aperture Shape: disc, n-blade polygon, heart, star, triangle or your own image.
6. Classical Bokeh: 'physical' (occlusion-aware, default) or 'bokehme'. Batches are rendered frame
   by frame.
Model files: none."""


GENFOCUS_MODEL_FILES = """Model files (local only; nothing is downloaded):
- models/diffusion_models/flux1-dev.safetensors: FLUX.1-dev (black-forest-labs/FLUX.1-dev; an fp8
  single file works too). Or its diffusers folder in models/diffusers/FLUX.1-dev/.
- models/vae/ae.safetensors: the FLUX.1 VAE (or the vae/ of the diffusers folder).
- models/loras/genfocus/deblurNet.safetensors and models/loras/genfocus/bokehNet.safetensors:
  the Genfocus LoRAs from huggingface.co/nycu-cplab/Genfocus-Model (models/genrefocus/ works too).
- optional: models/loras/genfocus/deblurNet_with_pre_deblur.safetensors (DeblurNet with a
  pre-deblurred image); leave pre_deblur_lora at none otherwise.
- models/genrefocus/genfocus_prompts.safetensors: GenRefocus' cached embeddings of the two fixed
  Genfocus prompts (no T5/CLIP needed at run time)."""

REFOCUS_NOTE = """GenRefocus - Genfocus refocus (DeblurNet + depth + BokehNet, FLUX.1-dev)

Inputs:
1. Load Image: any photo, blurry or sharp.
2. Focus Point: x, y as fractions of the width and height (0.5, 0.5 = centre). Or use
   'Focus from Mask' with a mask of the subject.
3. Refocus (Genfocus): k = blur strength (Genfocus' 0-50 slider, 20 = demo default; 0 = only
   deblur). steps 28 = official. long_side resizes large photos first (0 = keep). restore_size
   returns the input size. Outputs: refocused image, all-in-focus image, conditioning map.
4. Load Depth Model runs Depth Pro on the all-in-focus image (or wire a depth map into 'depth').
About 24 GB of weights: a 24 GB GPU (keep_loaded for fast edits) or patience on the CPU.
""" + GENFOCUS_MODEL_FILES + """
- models/depth/DepthPro/: Depth Pro in transformers format (apple/DepthPro-hf: config.json,
  model.safetensors, preprocessor_config.json)."""

DEBLUR_NOTE = """GenRefocus - Genfocus DeblurNet (all-in-focus from a blurry photo, FLUX.1-dev)

Inputs:
1. Load Image: a photo with defocus blur.
2. DeblurNet (Genfocus): steps 28 = official; noise 'reference' reproduces the official images,
   'seeded' uses the seed. long_side resizes large photos first (0 = keep); restore_size returns
   the input size. Optional: wire a pre-deblurred image into pre_deblurred (needs the pre-deblur
   LoRA in the loader).
3. Tiled Denoise Settings: large images are denoised in 512 px tiles (official); change the tile
   size, overlap or tiles per batch here, or delete the node for the defaults.
""" + GENFOCUS_MODEL_FILES

_LOADER_WIDGETS = {
    "transformer": "flux1-dev.safetensors",
    "vae": "ae.safetensors",
    "deblur_lora": "genfocus/deblurNet.safetensors",
    "bokeh_lora": "genfocus/bokehNet.safetensors",
    "pre_deblur_lora": "none",
    "prompts": "genfocus_prompts.safetensors",
    "dtype": "auto",
    "keep_loaded": False,
    "memory_mode": "auto",
    "condition_cache": "off",
}
_SAMPLER_WIDGETS = {"steps": 28, "seed": 0, "noise": "reference", "long_side": 0, "restore_size": True}


def build_refocus() -> None:
    build(
        "refocus",
        [
            {"id": 1, "type": "LoadImage", "title": "Load Image (photo)", "pos": [40, 60], "size": [300, 320],
             "widgets": {"image": "demo_input.png", "upload": "image"}},
            {"id": 2, "type": "GenRefocus_ModelLoader", "pos": [40, 420], "size": [340, 260],
             "widgets": dict(_LOADER_WIDGETS)},
            {"id": 3, "type": "GenRefocus_DepthModelLoader", "pos": [40, 720], "size": [340, 100],
             "widgets": {"model_name": "DepthPro", "dtype": "auto"}},
            {"id": 4, "type": "GenRefocus_FocusPoint", "pos": [420, 720], "size": [300, 100],
             "widgets": {"x": 0.5, "y": 0.62}},
            {"id": 5, "type": "GenRefocus_Refocus", "pos": [760, 300], "size": [320, 340],
             "widgets": {"k": 20.0, **_SAMPLER_WIDGETS}},
            {"id": 6, "type": "SaveImage", "pos": [1120, 60], "size": [420, 360],
             "widgets": {"filename_prefix": "genrefocus/refocus"}},
            {"id": 7, "type": "PreviewImage", "title": "All in focus", "pos": [1120, 460], "size": [300, 260],
             "widgets": {}},
            {"id": 8, "type": "PreviewImage", "title": "Conditioning map", "pos": [1440, 460],
             "size": [300, 260], "widgets": {}},
            {"id": 9, "type": "Note", "title": "Read me", "pos": [420, 20], "size": [640, 480],
             "widgets": {"text": REFOCUS_NOTE}},
        ],
        [
            (2, 0, 5, "pipe"),
            (1, 0, 5, "image"),
            (3, 0, 5, "depth_model"),
            (4, 0, 5, "focus"),
            (5, 0, 6, "images"),
            (5, 1, 7, "images"),
            (5, 2, 8, "images"),
        ],
    )


def build_deblur() -> None:
    build(
        "deblur",
        [
            {"id": 1, "type": "LoadImage", "title": "Load Image (blurry photo)", "pos": [40, 60],
             "size": [300, 320], "widgets": {"image": "demo_input.png", "upload": "image"}},
            {"id": 2, "type": "GenRefocus_ModelLoader", "pos": [40, 420], "size": [340, 260],
             "widgets": dict(_LOADER_WIDGETS)},
            {"id": 3, "type": "GenRefocus_TiledDenoise", "pos": [420, 560], "size": [300, 160],
             "widgets": {"tiling": "auto", "tile_size": 512, "tile_overlap": 0.125, "tile_batch": 4}},
            {"id": 4, "type": "GenRefocus_DeblurNet", "pos": [760, 300], "size": [320, 280],
             "widgets": dict(_SAMPLER_WIDGETS)},
            {"id": 5, "type": "SaveImage", "pos": [1120, 60], "size": [420, 360],
             "widgets": {"filename_prefix": "genrefocus/deblur"}},
            {"id": 6, "type": "Note", "title": "Read me", "pos": [420, 20], "size": [640, 500],
             "widgets": {"text": DEBLUR_NOTE}},
        ],
        [
            (2, 0, 4, "pipe"),
            (1, 0, 4, "image"),
            (3, 0, 4, "tiling"),
            (4, 0, 5, "images"),
        ],
    )


NATIVE_NOTE = """GenRefocus - Genfocus refocus on your ComfyUI FLUX (native backend)

The same pipeline as the 'refocus' workflow, on the FLUX.1-dev MODEL and VAE loaded by ComfyUI's
own loaders: no second (diffusers) copy of FLUX, ComfyUI's memory management (lowvram partial
loading, fp8 / GGUF models from their loader nodes work too).
Inputs:
1. Load Image: any photo, blurry or sharp.
2. Load Diffusion Model + Load VAE: FLUX.1-dev and its VAE, as for text-to-image. A checkpoint or
   GGUF loader works as well (wire its MODEL and VAE).
3. Genfocus LoRAs on ComfyUI Model: the Genfocus LoRAs act on the condition tokens only (they are
   never merged into the MODEL). prompts: the cached 512-token prompt embeddings (official, no
   T5/CLIP needed); or choose none and wire CLIP Text Encode (DualCLIPLoader, type flux) of the two
   fixed prompts into deblur_conditioning / bokeh_conditioning of Refocus (ComfyUI pads T5 to 256
   tokens, the official pipeline to 512: slightly different images).
4. Focus Point, Load Depth Model, Refocus (Genfocus): as in the 'refocus' workflow. Conditions are
   VAE-encoded to the posterior mean (the official code samples it): see README "Which backend?".
Model files (local only; nothing is downloaded):
- models/diffusion_models/flux1-dev.safetensors: FLUX.1-dev (bf16, or an fp8 single file).
- models/vae/ae.safetensors: the FLUX.1 VAE.
- models/loras/genfocus/deblurNet.safetensors and models/loras/genfocus/bokehNet.safetensors:
  the Genfocus LoRAs from huggingface.co/nycu-cplab/Genfocus-Model (models/genrefocus/ works too).
- models/genrefocus/genfocus_prompts.safetensors: cached embeddings of the two fixed prompts.
- models/depth/DepthPro/: Depth Pro in transformers format (apple/DepthPro-hf)."""


def build_refocus_native() -> None:
    build(
        "refocus_native",
        [
            {"id": 1, "type": "LoadImage", "title": "Load Image (photo)", "pos": [40, 60], "size": [300, 320],
             "widgets": {"image": "demo_input.png", "upload": "image"}},
            {"id": 2, "type": "UNETLoader", "title": "Load Diffusion Model", "pos": [40, 420],
             "size": [320, 100],
             "widgets": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
            {"id": 3, "type": "VAELoader", "title": "Load VAE", "pos": [40, 560], "size": [320, 80],
             "widgets": {"vae_name": "ae.safetensors"}},
            {"id": 4, "type": "GenRefocus_NativeModelLoader", "pos": [400, 420], "size": [340, 200],
             "widgets": {k: _LOADER_WIDGETS[k] for k in ("deblur_lora", "bokeh_lora", "pre_deblur_lora",
                                                         "prompts")}},
            {"id": 5, "type": "GenRefocus_DepthModelLoader", "pos": [40, 680], "size": [340, 100],
             "widgets": {"model_name": "DepthPro", "dtype": "auto"}},
            {"id": 6, "type": "GenRefocus_FocusPoint", "pos": [400, 680], "size": [300, 100],
             "widgets": {"x": 0.5, "y": 0.62}},
            {"id": 7, "type": "GenRefocus_Refocus", "pos": [780, 300], "size": [320, 340],
             "widgets": {"k": 20.0, **_SAMPLER_WIDGETS}},
            {"id": 8, "type": "SaveImage", "pos": [1140, 60], "size": [420, 360],
             "widgets": {"filename_prefix": "genrefocus/refocus_native"}},
            {"id": 9, "type": "PreviewImage", "title": "All in focus", "pos": [1140, 460], "size": [300, 260],
             "widgets": {}},
            {"id": 10, "type": "PreviewImage", "title": "Conditioning map", "pos": [1460, 460],
             "size": [300, 260], "widgets": {}},
            {"id": 11, "type": "Note", "title": "Read me", "pos": [400, 0], "size": [700, 400],
             "widgets": {"text": NATIVE_NOTE}},
        ],
        [
            (2, 0, 4, "model"),
            (3, 0, 4, "vae"),
            (4, 0, 7, "pipe"),
            (1, 0, 7, "image"),
            (5, 0, 7, "depth_model"),
            (6, 0, 7, "focus"),
            (7, 0, 8, "images"),
            (7, 1, 9, "images"),
            (7, 2, 10, "images"),
        ],
    )


CAMERA_NOTE = """GenRefocus - same photo, new aperture (camera controls; no model files needed)

"Shot at f/8, show it at f/1.4": the blur strength K comes from the photo's lens (EXIF) and the
aperture you pick, by the thin-lens formula (paper Eq. 3), instead of a slider.
Inputs:
1. Load Image (photo) and Read Camera EXIF: pick the SAME photo (a JPEG with EXIF) in both. The
   35 mm-equivalent focal length gives the sensor width; if the file lacks it, set sensor_width_mm
   (36 full frame, 23.5 APS-C, 17.3 Micro Four Thirds).
2. Load Image (depth) + Depth from Image: a METRIC depth map, grey value x metric_scale = metres
   (here white = 10 m). Or estimate it: Load Depth Model (DepthPro) -> Estimate Depth on the photo,
   its depth wired into K from Camera and Defocus Map. Relative depth (Depth Anything, most depth
   nodes) has no metres: K from Camera refuses it; set k by hand on the Defocus Map then.
3. Focus Point: what stays sharp; the depth there is the focus distance.
4. Camera Settings: f_number = the aperture to render (f/1.4 here); focal length and sensor come
   from the EXIF ('from camera input', focal_length_mm 0), or type them.
5. K from Camera -> the Defocus Map's k (a link into its k widget); its summary output explains
   the numbers (focus distance, K in px*m).
6. Aperture Shape and Classical Bokeh render it; Save Image.
Model files: none. For Estimate Depth: models/depth/DepthPro/ (apple/DepthPro-hf, transformers
format: config.json, model.safetensors, preprocessor_config.json)."""


def build_camera_refocus() -> None:
    build(
        "camera_refocus",
        [
            {"id": 1, "type": "LoadImage", "title": "Load Image (photo)", "pos": [40, 60], "size": [300, 320],
             "widgets": {"image": "camera_photo.jpg", "upload": "image"}},
            {"id": 2, "type": "GenRefocus_ReadCameraEXIF", "pos": [40, 420], "size": [300, 300],
             "widgets": {"image": "camera_photo.jpg", "sensor_width_mm": 0.0}},
            {"id": 3, "type": "LoadImage", "title": "Load Image (metric depth)", "pos": [40, 760],
             "size": [300, 320], "widgets": {"image": "camera_depth.png", "upload": "image"}},
            {"id": 4, "type": "GenRefocus_DepthFromImage", "pos": [380, 760], "size": [300, 130],
             "widgets": {"interpretation": "metric_depth", "invert": False, "metric_scale": 10.0}},
            {"id": 5, "type": "GenRefocus_FocusPoint", "pos": [380, 940], "size": [300, 260],
             "widgets": {"x": 0.5, "y": 0.62}},
            {"id": 6, "type": "GenRefocus_CameraSettings", "pos": [380, 420], "size": [300, 160],
             "widgets": {"f_number": 1.4, "focal_length_mm": 0.0, "sensor": "from camera input",
                         "sensor_width_mm": 36.0}},
            {"id": 7, "type": "GenRefocus_KFromCamera", "pos": [720, 420], "size": [300, 100], "widgets": {}},
            {"id": 8, "type": "GenRefocus_DefocusMap", "pos": [720, 600], "size": [300, 180],
             "widgets": {"k": 20.0, "width": 0, "height": 0}},
            {"id": 9, "type": "GenRefocus_Aperture", "pos": [720, 840], "size": [300, 260],
             "widgets": {"shape": "disc", "blades": 9, "rotation_deg": 0.0, "roundness": 1.0,
                         "scaling": "equal_area", "flip_foreground": True}},
            {"id": 10, "type": "GenRefocus_ClassicalBokeh", "pos": [1060, 420], "size": [300, 180],
             "widgets": {"mode": "physical", "gamma": 2.2, "highlight": True}},
            {"id": 11, "type": "SaveImage", "pos": [1400, 60], "size": [420, 360],
             "widgets": {"filename_prefix": "genrefocus/camera_refocus"}},
            {"id": 12, "type": "PreviewImage", "title": "Defocus preview", "pos": [1060, 660],
             "size": [300, 260], "widgets": {}},
            {"id": 13, "type": "Note", "title": "Read me: same photo, new aperture", "pos": [380, 0],
             "size": [640, 400], "widgets": {"text": CAMERA_NOTE}},
        ],
        [
            (3, 0, 4, "image"),
            (1, 0, 5, "image"),
            (2, 0, 6, "camera"),
            (6, 0, 7, "camera"),
            (4, 0, 7, "depth"),
            (5, 0, 7, "focus"),
            (4, 0, 8, "depth"),
            (7, 0, 8, "k"),
            (5, 0, 8, "focus"),
            (1, 0, 10, "image"),
            (8, 0, 10, "defocus"),
            (9, 0, 10, "aperture"),
            (10, 0, 11, "images"),
            (8, 1, 12, "images"),
        ],
    )


DEPTH_TO_BOKEH_NOTE = """GenRefocus - photo -> depth -> click to focus -> bokeh (no model files needed)

Inputs:
1. Load Image (photo): an all-in-focus photo.
2. Load Image (depth) + Depth from Image: its grey depth map, same size, near = bright
   (relative_disparity; metric depth in metres: 'metric_depth'; near dark: 'invert'). Never a
   colour-mapped preview. To try it without files: python -m genrefocus_core demo -o <ComfyUI>/input
   in this pack's folder, then pick demo_input.png and demo_disparity.png.
   Estimate the depth instead: add Load Depth Model (DepthPro or Depth Anything V2 in models/depth/)
   and Estimate Depth, wire the photo into Estimate Depth's image and its depth output into the
   Defocus Map's depth; delete the depth Load Image and Depth from Image.
3. Focus Point (click to focus): queue once, the photo appears in the node; click on it to set
   x, y (the yellow crosshair), queue again. You can also type x, y (0..1 of width and height).
4. Defocus Map: K = blur strength (largest blur radius in px for relative maps; px*m for metric).
   Its preview (shown in the node): black = sharp, orange = in front, blue = behind the focus.
5. Aperture Shape and Classical Bokeh ('physical', occlusion-aware) render it; Save Image.
Model files: none. With Estimate Depth: models/depth/DepthPro/ (apple/DepthPro-hf, transformers
format: config.json, model.safetensors, preprocessor_config.json) or a Depth Anything V2 folder."""


def build_depth_to_bokeh() -> None:
    build(
        "depth_to_bokeh",
        [
            {"id": 1, "type": "LoadImage", "title": "Load Image (photo)", "pos": [40, 60], "size": [300, 320],
             "widgets": {"image": "demo_input.png", "upload": "image"}},
            {"id": 2, "type": "LoadImage", "title": "Load Image (depth)", "pos": [40, 420],
             "size": [300, 320], "widgets": {"image": "demo_disparity.png", "upload": "image"}},
            {"id": 3, "type": "GenRefocus_DepthFromImage", "pos": [380, 620], "size": [320, 130],
             "widgets": {"interpretation": "relative_disparity", "invert": False, "metric_scale": 1.0}},
            {"id": 4, "type": "GenRefocus_FocusPoint", "title": "Focus Point (click to focus)",
             "pos": [740, 60], "size": [380, 400], "widgets": {"x": 0.5, "y": 0.62}},
            {"id": 5, "type": "GenRefocus_DefocusMap", "pos": [740, 500], "size": [380, 420],
             "widgets": {"k": 40.0, "width": 0, "height": 0}},
            {"id": 6, "type": "GenRefocus_Aperture", "pos": [1160, 60], "size": [320, 460],
             "widgets": {"shape": "polygon", "blades": 7, "rotation_deg": 0.0, "roundness": 0.3,
                         "scaling": "equal_area", "flip_foreground": True}},
            {"id": 7, "type": "GenRefocus_ClassicalBokeh", "pos": [1160, 560], "size": [320, 160],
             "widgets": {"mode": "physical", "gamma": 2.2, "highlight": True}},
            {"id": 8, "type": "SaveImage", "pos": [1520, 60], "size": [400, 400],
             "widgets": {"filename_prefix": "genrefocus/depth_to_bokeh"}},
            {"id": 9, "type": "Note", "title": "Read me", "pos": [380, 60], "size": [320, 520],
             "widgets": {"text": DEPTH_TO_BOKEH_NOTE}},
        ],
        [
            (2, 0, 3, "image"),
            (1, 0, 4, "image"),
            (3, 0, 5, "depth"),
            (4, 0, 5, "focus"),
            (1, 0, 7, "image"),
            (5, 0, 7, "defocus"),
            (6, 0, 7, "aperture"),
            (7, 0, 8, "images"),
        ],
    )


def main() -> None:
    build(
        "classical_refocus",
        [
            {
                "id": 1,
                "type": "LoadImage",
                "title": "Load Image (photo)",
                "pos": [40, 60],
                "size": [300, 320],
                "widgets": {"image": "demo_input.png", "upload": "image"},
            },
            {
                "id": 2,
                "type": "LoadImage",
                "title": "Load Image (depth)",
                "pos": [40, 420],
                "size": [300, 320],
                "widgets": {"image": "demo_disparity.png", "upload": "image"},
            },
            {
                "id": 3,
                "type": "GenRefocus_DepthFromImage",
                "pos": [380, 420],
                "widgets": {"interpretation": "relative_disparity", "invert": False, "metric_scale": 1.0},
            },
            {
                "id": 4,
                "type": "GenRefocus_FocusPoint",
                "pos": [380, 640],
                "size": [300, 100],
                "widgets": {"x": 0.5, "y": 0.62},
            },
            {
                "id": 5,
                "type": "GenRefocus_DefocusMap",
                "pos": [720, 420],
                "size": [300, 180],
                "widgets": {"k": 40.0, "width": 0, "height": 0},
            },
            {
                "id": 6,
                "type": "GenRefocus_Aperture",
                "pos": [720, 660],
                "size": [300, 260],
                "widgets": {
                    "shape": "polygon",
                    "blades": 7,
                    "rotation_deg": 0.0,
                    "roundness": 0.3,
                    "scaling": "equal_area",
                    "flip_foreground": True,
                },
            },
            {
                "id": 7,
                "type": "GenRefocus_ClassicalBokeh",
                "pos": [1060, 160],
                "size": [300, 180],
                "widgets": {"mode": "physical", "gamma": 2.2, "highlight": True},
            },
            {
                "id": 8,
                "type": "SaveImage",
                "pos": [1400, 60],
                "size": [420, 360],
                "widgets": {"filename_prefix": "genrefocus/classical"},
            },
            {
                "id": 9,
                "type": "PreviewImage",
                "title": "Defocus preview",
                "pos": [1060, 420],
                "size": [300, 260],
                "widgets": {},
            },
            {
                "id": 10,
                "type": "Note",
                "title": "Read me",
                "pos": [380, 40],
                "size": [640, 340],
                "widgets": {"text": CLASSICAL_NOTE},
            },
        ],
        [
            (2, 0, 3, "image"),
            (1, 0, 4, "image"),
            (4, 0, 5, "focus"),
            (3, 0, 5, "depth"),
            (1, 0, 7, "image"),
            (5, 0, 7, "defocus"),
            (6, 0, 7, "aperture"),
            (7, 0, 8, "images"),
            (5, 1, 9, "images"),
        ],
    )

    build_refocus()
    build_deblur()
    build_refocus_native()
    build_camera_refocus()
    build_depth_to_bokeh()


if __name__ == "__main__":
    main()
