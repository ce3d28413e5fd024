"""Loading a base causal LM and a LoRA adapter from local paths, safely (safetensors only, no remote code)."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import ConfigurationError


def load_base_model(model: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """A local model directory, or a local `.gguf` file, loaded with attention that has a double backward."""
    from transformers import AutoModelForCausalLM

    path = Path(model)
    if not path.exists():
        raise ConfigurationError(
            f"Base model {model!r} not found; give a local model directory or .gguf file."
        )
    kwargs = {"dtype": dtype, "attn_implementation": "eager", "trust_remote_code": trust_remote_code}
    if path.is_file() and path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
        # GGUF weights are dequantized to `dtype` on load; drop the quantizer marker so that the Trainer
        # accepts the model for LoRA training like any other float model.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        return model
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(path), use_safetensors=True, local_files_only=True, **kwargs
        )
    except (OSError, ValueError) as e:
        raise ConfigurationError(f"Cannot load the base model from {model!r}: {e}") from None


def check_adapter_dir(adapter: str) -> None:
    """A PEFT adapter directory with safetensors weights, or a `ConfigurationError` saying what is wrong."""
    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise ConfigurationError(f"{adapter!r} is not a PEFT adapter directory (no adapter_config.json).")
    if not (path / "adapter_model.safetensors").is_file():
        raise ConfigurationError(
            f"{adapter!r} has no adapter_model.safetensors; only safetensors adapters are loaded (no pickle)."
        )


def load_adapter(base, adapter: str, is_trainable: bool = True):
    from peft import PeftModel

    check_adapter_dir(adapter)
    try:
        return PeftModel.from_pretrained(base, adapter, is_trainable=is_trainable)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigurationError(f"The adapter {adapter!r} does not fit the base model: {e}") from None


def adapter_dtype(adapter: str) -> torch.dtype:
    """The dtype the adapter's weights are stored in."""
    from safetensors import safe_open

    with safe_open(str(Path(adapter) / "adapter_model.safetensors"), framework="pt") as f:
        return f.get_tensor(next(iter(f.keys()))).dtype


def load_tokenizer(path: str | None, trust_remote_code: bool = False):
    """The tokenizer at `path` (a directory or .gguf file); None when `path` is None."""
    if path is None:
        return None
    from transformers import AutoTokenizer

    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    try:
        return AutoTokenizer.from_pretrained(
            str(p), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise ConfigurationError(f"Cannot load a tokenizer from {path!r}: {e}") from None


def tokenizer_source(tokenizer: str | None, adapter: str, model: str) -> str | None:
    """Where text rows' tokenizer comes from: `tokenizer` if given, else the adapter's directory (where
    `hf-unlearn train` and the Trainer save the one the adapter was trained with), else the base model's."""
    return tokenizer or next((p for p in (adapter, model) if has_tokenizer(p)), None)


def has_tokenizer(path: str) -> bool:
    p = Path(path)
    return (
        (p.is_file() and p.suffix == ".gguf")
        or (p / "tokenizer_config.json").is_file()
        or (p / "tokenizer.json").is_file()
    )
