"""The vLLM plugin (entry point `vllm.general_plugins`): lets the CacheBlend connector find the
model vLLM loaded, without a patch to vLLM.

vLLM hands a KV connector its paged caches but not its model, and the blend must run the
model's own layers. The plugin registers, under vLLM's own architecture name, a subclass of its
Llama class that only records the instance it builds (one model per worker process). Generation
is unchanged: the subclass adds no behaviour. Loaded in every vLLM process at start-up.
"""

from __future__ import annotations

import weakref
from typing import Optional

_loaded: Optional[weakref.ref] = None

# vLLM architecture names served by its Llama implementation that the blend supports
ARCHITECTURES = ("LlamaForCausalLM",)


def register() -> None:
    from vllm import ModelRegistry

    for arch in ARCHITECTURES:
        ModelRegistry.register_model(arch, "engine.vllm_plugin:TrackedLlamaForCausalLM")


def loaded_model():
    """The model this process's vLLM built, or None (not built yet, or not a tracked architecture)."""
    return _loaded() if _loaded is not None else None


def _track(model) -> None:
    global _loaded
    _loaded = weakref.ref(model)


def __getattr__(name: str):
    # vLLM imports the class by name when it builds the model; defined lazily so that the plugin
    # itself imports nothing from vLLM (it runs in every vLLM process, before the model exists)
    if name == "TrackedLlamaForCausalLM":
        from vllm.model_executor.models.llama import LlamaForCausalLM

        class TrackedLlamaForCausalLM(LlamaForCausalLM):
            def __init__(self, *, vllm_config, prefix: str = ""):  # vLLM reads this signature
                super().__init__(vllm_config=vllm_config, prefix=prefix)
                _track(self)

        globals()[name] = TrackedLlamaForCausalLM
        return TrackedLlamaForCausalLM
    raise AttributeError(name)
