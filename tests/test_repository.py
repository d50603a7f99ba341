"""The repository stands alone: users clone it and nothing beside it."""

from pathlib import Path

from treedec.tools.prompts import CATEGORY_ORDER, SPEC_BENCH_DEV, load_questions

ROOT = Path(__file__).resolve().parents[1]


def test_no_code_reads_files_outside_the_repository():
    code = [*ROOT.glob("python/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("bench/*.py"),
            *ROOT.glob("bench/*.sh"), *ROOT.glob("triton_kernels/*.py"), ROOT / "Makefile", ROOT / ".ci" / "run"]
    outside = "../" + "shared"  # spelled in two parts, so this file does not match itself
    found = [str(path.relative_to(ROOT)) for path in code if outside in path.read_text()]
    assert not found, f"these read {outside}/, which a clone of the repository alone lacks: {found}"


def test_the_spec_bench_prompts_ship_with_the_package():
    prompts = load_questions(SPEC_BENCH_DEV)
    assert len(prompts) == 240 and {p.category for p in prompts} == set(CATEGORY_ORDER)
    assert "Apache License" in (SPEC_BENCH_DEV.parent / "LICENSE").read_text()


RUNTIME_ONLY = """
import sys

class Refuse:  # the lab and its own dependencies may not be imported
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[:2] == ["treedec", "tools"] or name.split(".")[0] in ("gguf", "matplotlib"):
            raise ImportError(f"the runtime imported {name}")

sys.meta_path.insert(0, Refuse())
import torch, transformers, treedec
config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1)
model = transformers.LlamaForCausalLM(config).eval()
ids = torch.tensor([[3, 4, 5, 3, 4, 5, 3]])
for drafter in (None, "lookup", "recycling", "auto", "layerskip"):
    treedec.patch(model, drafter=drafter)
    model.generate(ids, max_new_tokens=4, do_sample=False)
    model.generate(ids, max_new_tokens=4, do_sample=True)
    treedec.unpatch(model)
treedec.audit(model, [ids], max_new_tokens=3)
print("runtime alone: ok")
"""


def test_the_runtime_imports_nothing_from_the_tools():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", RUNTIME_ONLY], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "runtime alone: ok" in done.stdout, done.stderr[-3000:]


def test_code_cites_documents_inside_the_repository_that_exist():
    """The contracts the code cites live in docs/design.md (not in a design file beside the clone), and
    every docs/ or bench/ page a source file names is there."""
    import re

    sources = [*ROOT.glob("python/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("triton_kernels/*.py"),
               *ROOT.glob("csrc/**/*.h"), *ROOT.glob("csrc/**/*.cpp"), *ROOT.glob("csrc/**/*.cu"),
               *ROOT.glob("bench/*.py"), ROOT / "README.md", *ROOT.glob("docs/*.md")]
    stale, missing = [], []
    for path in sources:
        text = path.read_text()
        if "DESIGN" + ".md" in text:  # spelled in two parts, so this file does not match itself
            stale.append(str(path.relative_to(ROOT)))
        for cited in re.findall(r"\b((?:docs|bench/results)/[\w./-]+\.md)\b", text):
            if not (ROOT / cited).exists():
                missing.append(f"{path.relative_to(ROOT)} -> {cited}")
    assert not stale, f"these cite the old DESIGN file instead of docs/design.md: {stale}"
    assert not missing, f"cited documents that do not exist: {missing}"
