"""Every CUDA source compiles (sm_80 and sm_90a), and the pybind11 module links and imports.

Runs wherever nvcc is on PATH, GPU or not, so the .cu files never rot. The sources are compiled
in parallel into a temporary directory once per session; the linked module is imported to check
the exact Python signatures that treedec.ops calls, and a zero-size call (no launch) returns.
"""

import importlib.util
import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")

CUDA_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
GENCODE = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a"]
COMMON = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC,-Wall,-Wextra"]


def _pybind11_includes() -> list[str]:
    pybind11 = pytest.importorskip("pybind11")
    return ["-I", pybind11.get_include(), "-I", sysconfig.get_paths()["include"]]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Compile every .cu (both architectures) and bindings.cpp in parallel; results by file name."""
    out = tmp_path_factory.mktemp("treedec_cuda")
    jobs = {src.name: [NVCC, *COMMON, *GENCODE, "-c", str(src), "-o", str(out / (src.stem + ".o"))] for src in SOURCES}
    jobs["bindings.cpp"] = [
        NVCC, *COMMON, *_pybind11_includes(), "-c", str(CUDA_DIR / "bindings.cpp"), "-o", str(out / "bindings.o")
    ]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = dict(zip(jobs, pool.map(_run, jobs.values())))
    return out, results


def test_sources_exist():
    assert {src.name for src in SOURCES} >= {"build_tree.cu", "verify_greedy.cu", "sample_tokens.cu", "compact_kv.cu"}


@pytest.mark.parametrize("name", [src.name for src in SOURCES] + ["bindings.cpp"])
def test_compiles_without_warnings(build, name):
    _, results = build
    result = results[name]
    assert result.returncode == 0, f"nvcc failed on {name}:\n{result.stderr}"
    assert "warning" not in result.stderr.lower(), f"{name} compiled with warnings:\n{result.stderr}"


def test_module_links_and_has_the_ops_signatures(build):
    out, results = build
    if any(result.returncode for result in results.values()):
        pytest.skip("a source failed to compile (reported above)")
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    module_path = out / f"_cuda{suffix}"
    objects = [str(out / (name.rsplit(".", 1)[0] + ".o")) for name in results]
    link = _run([NVCC, "-shared", *objects, "-o", str(module_path)])
    assert link.returncode == 0, link.stderr

    spec = importlib.util.spec_from_file_location("_cuda", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    expected = {
        "build_tree": "parents_ptr, depth_ptr, mask_ptr, B, T, stream",
        "verify_greedy": "parents_ptr, tokens_ptr, target_ptr, accept_len_ptr, accept_nodes_ptr, bonus_ptr, B, T, stream",
        "sample_tokens": "probs_ptr, uniforms_ptr, tokens_ptr, N, V, stream",
        "compact_kv": "ptr_array_ptr, num_tensors, prefix_len_ptr, accept_nodes_ptr, B, H, S, D, elem_size, T, stream",
    }
    for name, args in expected.items():
        doc_args = module.__dict__[name].__doc__.split("(", 1)[1].split(")", 1)[0]
        assert [part.split(":")[0].strip() for part in doc_args.split(",")] == args.split(", ")
    # Nothing to do: returns without touching the device (works on machines without a GPU).
    module.build_tree(0, 0, 0, 0, 5, 0)
    module.verify_greedy(0, 0, 0, 0, 0, 0, 0, 5, 0)
    module.sample_tokens(0, 0, 0, 0, 7, 0)
    module.compact_kv(0, 0, 0, 0, 1, 1, 1, 1, 2, 5, 0)
