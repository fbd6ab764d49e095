"""Test-only stand-in of ComfyUI's ``folder_paths``: the model-folder registry GenRefocus' loaders use.

Same observable behaviour as ComfyUI 0.3.6x for these calls: ``folder_names_and_paths`` maps a key
to ``(list_of_folders, extensions)``; ``add_model_folder_path`` appends a folder (or moves/inserts it
first with ``is_default``) and creates a new key with no extension filter; ``get_folder_paths``
returns a copy; file lists are sorted paths relative to each folder (no cache here). The base folder
is a path under the system temp dir that nothing creates, so no model is found unless a test
registers one.
"""
from __future__ import annotations

import os
import tempfile

supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}

base_path = os.path.join(tempfile.gettempdir(), "genrefocus-comfy-stub-base")
models_dir = os.path.join(base_path, "models")

folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {
    "checkpoints": ([os.path.join(models_dir, "checkpoints")], set(supported_pt_extensions)),
    "loras": ([os.path.join(models_dir, "loras")], set(supported_pt_extensions)),
    "vae": ([os.path.join(models_dir, "vae")], set(supported_pt_extensions)),
    "text_encoders": ([os.path.join(models_dir, "text_encoders"), os.path.join(models_dir, "clip")],
                      set(supported_pt_extensions)),
    "diffusion_models": ([os.path.join(models_dir, "unet"), os.path.join(models_dir, "diffusion_models")],
                         set(supported_pt_extensions)),
    "diffusers": ([os.path.join(models_dir, "diffusers")], {"folder"}),
}

_LEGACY = {"unet": "diffusion_models", "clip": "text_encoders"}


def map_legacy(folder_name: str) -> str:
    return _LEGACY.get(folder_name, folder_name)


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    folder_name = map_legacy(folder_name)
    if folder_name not in folder_names_and_paths:
        folder_names_and_paths[folder_name] = ([full_folder_path], set())
        return
    paths = folder_names_and_paths[folder_name][0]
    if full_folder_path in paths:
        if is_default and paths[0] != full_folder_path:
            paths.remove(full_folder_path)
            paths.insert(0, full_folder_path)
    elif is_default:
        paths.insert(0, full_folder_path)
    else:
        paths.append(full_folder_path)


def get_folder_paths(folder_name: str) -> list[str]:
    return list(folder_names_and_paths[map_legacy(folder_name)][0])


def get_filename_list(folder_name: str) -> list[str]:
    folders, extensions = folder_names_and_paths[map_legacy(folder_name)]
    found = set()
    for root in folders:
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = [d for d in dirnames if d != ".git"]
            for name in filenames:
                if not extensions or os.path.splitext(name)[1].lower() in extensions:
                    found.add(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


def get_full_path(folder_name: str, filename: str) -> str | None:
    folder_name = map_legacy(folder_name)
    if folder_name not in folder_names_and_paths:
        return None
    relative = os.path.relpath(os.path.join(os.sep, filename), os.sep)  # no escaping the folder with ".."
    for root in folder_names_and_paths[folder_name][0]:
        candidate = os.path.join(root, relative)
        if os.path.isfile(candidate):
            return candidate
    return None


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    path = get_full_path(folder_name, filename)
    if path is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return path


# Input folder (core Load Image and GenRefocus' Read Camera EXIF list and read files here).
input_directory = os.path.join(base_path, "input")
_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def get_input_directory() -> str:
    return input_directory


def set_input_directory(path: str) -> None:
    global input_directory
    input_directory = path


def filter_files_content_types(files: list[str], content_types: list[str]) -> list[str]:
    """Only ``"image"`` is known here (by extension)."""
    if "image" not in content_types:
        return []
    return [f for f in files if os.path.splitext(f)[1].lower() in _IMAGE_EXT]


def _annotated(name: str) -> tuple[str, str]:
    for tag in ("input", "output", "temp"):
        if name.endswith(f" [{tag}]"):
            base = input_directory if tag == "input" else os.path.join(base_path, tag)
            return name[: -len(tag) - 3], base
    return name, input_directory


def get_annotated_filepath(name: str, default_dir: str | None = None) -> str:
    name, base = _annotated(name)
    return os.path.join(base, name)


def exists_annotated_filepath(name: str) -> bool:
    return os.path.exists(get_annotated_filepath(name))
