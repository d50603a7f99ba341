"""The repository stands alone: users clone it and nothing beside it."""

from pathlib import Path

from treedec.prompts import CATEGORY_ORDER, SPEC_BENCH_DEV, load_questions

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
