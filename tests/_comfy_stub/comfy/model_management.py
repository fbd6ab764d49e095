"""Test-only stand-in of the ``comfy.model_management`` calls used by GenRefocus' nodes."""
import torch


class InterruptProcessingException(Exception):
    pass


interrupt_processing = False


def interrupt_current_processing(value=True):
    global interrupt_processing
    interrupt_processing = value


def processing_interrupted():
    return interrupt_processing


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    if interrupt_processing:
        interrupt_processing = False
        raise InterruptProcessingException()


def get_torch_device():
    return torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


def unet_offload_device():
    return torch.device("cpu")


def soft_empty_cache(force=False):
    return None


current_loaded_models: list = []


def free_memory(memory_required, device, keep_loaded=()):
    """Like ComfyUI's: ask every registered model on ``device`` to unload; drop those that did."""
    done = [m for m in list(current_loaded_models)
            if m.device == device and m not in keep_loaded and m.model_unload(memory_required)]
    current_loaded_models[:] = [m for m in current_loaded_models if not any(m is d for d in done)]
    return done


def unload_all_models():
    free_memory(1e30, get_torch_device())


LOADED: list = []


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    LOADED.append((list(models), memory_required))
