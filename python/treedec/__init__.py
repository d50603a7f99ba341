"""treedec: lossless tree speculative decoding for Hugging Face causal LMs.

    model = treedec.AutoModelForCausalLM.from_pretrained(name, drafter="auto")
    model = treedec.patch(hf_model, drafter="lookup")   # in place; treedec.unpatch(model) undoes it
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=256)
    print(treedec.audit(hf_model, prompts, drafter="auto").table())   # HF and treedec side by side
"""

from .auditing import audit
from .models import load_default_model
from .patching import AutoModelForCausalLM, patch, unpatch
from .tree import Tree

__version__ = "0.1.0"
__all__ = ["AutoModelForCausalLM", "Tree", "audit", "load_default_model", "patch", "unpatch", "__version__"]
