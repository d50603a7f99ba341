"""treedec: lossless tree speculative decoding for Hugging Face causal LMs.

    model = treedec.AutoModelForCausalLM.from_pretrained(name, drafter="auto")
    model = treedec.patch(hf_model, drafter="lookup")   # in place; treedec.unpatch(model) undoes it
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=256)
    print(treedec.audit(hf_model, prompts, drafter="auto").table())   # HF and treedec side by side

The lab (the `treedec` command, benchmarks, head training, the embedded model) is `treedec.tools`.
"""

from .auditing import audit
from .patching import AutoModelForCausalLM, patch, unpatch

__version__ = "0.1.0"
__all__ = ["AutoModelForCausalLM", "audit", "patch", "unpatch", "__version__"]
