"""Build treedec's native extensions.

- `treedec._C`: the C++ CPU kernels in csrc/*.cpp, always built (-O3, OpenMP). Vector code picks
  its instruction set at run time, so no -march flag is needed and the build runs on any x86-64.
- `treedec._cuda`: every csrc/cuda/*.cu compiled by nvcc (sm_80, sm_90a; TREEDEC_CUDA_ARCHS) and linked with
  csrc/cuda/bindings.cpp, only when TREEDEC_BUILD_CUDA=1, or when nvcc is found and a CUDA GPU is
  usable. Otherwise it is skipped with a one-line message. TREEDEC_BUILD_CUDA=0 never builds it.
"""

import glob
import os
import shutil
import subprocess
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# TREEDEC_CUDA_ARCHS="90a" (comma-separated) builds for fewer cards, e.g. only the one at hand.
CUDA_ARCHS = tuple(a.strip() for a in os.environ.get("TREEDEC_CUDA_ARCHS", "80,90a").split(",") if a.strip())


def rel(*parts: str) -> str:
    return os.path.relpath(os.path.join(ROOT, *parts), ROOT)


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    )


def find_cuda_home(nvcc: str) -> str:
    """The toolkit root holding include/cuda_runtime_api.h (nvcc on PATH may be a wrapper script)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            return home
    raise RuntimeError(f"cannot find the CUDA toolkit of {nvcc} (set CUDA_HOME)")


def cuda_gpu_usable() -> bool:
    """torch.cuda.is_available() when torch is importable (it is not under build isolation),
    else whether an NVIDIA driver is loaded."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return os.path.exists("/proc/driver/nvidia/version")


def cuda_decision() -> tuple[bool, str]:
    flag = os.environ.get("TREEDEC_BUILD_CUDA", "").strip()
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if flag == "0":
        return False, "TREEDEC_BUILD_CUDA=0"
    if not sources:
        return False, "csrc/cuda has no .cu files"
    if not os.path.exists(os.path.join(ROOT, "csrc", "cuda", "bindings.cpp")):
        return False, "csrc/cuda/bindings.cpp is missing"
    nvcc = find_nvcc()
    if flag == "1":
        if nvcc is None:
            raise RuntimeError("TREEDEC_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        return True, ""
    if nvcc is None:
        return False, "nvcc not found"
    if not cuda_gpu_usable():
        return False, "no usable CUDA GPU (set TREEDEC_BUILD_CUDA=1 to build anyway)"
    return True, ""


class BuildExt(build_ext):
    """pybind11's build_ext, plus nvcc for the .cu sources of the CUDA extension."""

    def build_extension(self, ext):
        if ext.name != "treedec._cuda":
            return super().build_extension(ext)
        nvcc = find_nvcc()
        cuda_home = find_cuda_home(nvcc)
        objects_dir = os.path.join(self.build_temp, "cuda")
        os.makedirs(objects_dir, exist_ok=True)
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
        objects = []
        for source in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
            obj = os.path.join(objects_dir, os.path.basename(source) + ".o")
            cmd = [nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
                   "-I", os.path.join(ROOT, "csrc"), "-I", os.path.join(ROOT, "csrc", "cuda"), *gencode,
                   "-c", source, "-o", obj]
            print(" ".join(cmd))
            subprocess.check_call(cmd)
            objects.append(obj)
        ext.extra_objects = objects
        ext.include_dirs = [*ext.include_dirs, os.path.join(cuda_home, "include")]
        # Static cudart: the module runs next to whatever CUDA runtime torch ships.
        ext.library_dirs = [*ext.library_dirs, os.path.join(cuda_home, "lib64")]
        ext.libraries = [*ext.libraries, "cudart_static", "dl", "rt", "pthread"]
        return super().build_extension(ext)


ext_modules = [
    Pybind11Extension(
        "treedec._C",
        sorted(rel(p) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))),
        include_dirs=[rel("csrc")],
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
        cxx_std=17,
    )
]

build_cuda, why_not = cuda_decision()
if build_cuda:
    ext_modules.append(
        Pybind11Extension(
            "treedec._cuda",
            [rel("csrc", "cuda", "bindings.cpp")],
            include_dirs=[rel("csrc"), rel("csrc", "cuda")],
            extra_compile_args=["-O3"],
            cxx_std=17,
        )
    )
else:
    print(f"treedec: skipping the CUDA extension treedec._cuda ({why_not})", file=sys.stderr)

# The Triton kernels live in the top-level triton_kernels/ (kernel engineers read them there) and
# install as the private package `treedec_triton` (PyPI's `triton_kernels` is another project).
setup(
    packages=[*find_packages("python"), "treedec_triton"],
    package_dir={"": "python", "treedec_triton": "triton_kernels"},
    package_data={"treedec": ["heads/weights/*/heads.json", "heads/weights/*/heads.safetensors",
                              "heads/weights/*/token_frequencies.safetensors",
                              "eagle/weights/*/config.json", "eagle/weights/*/model.safetensors",
                              "tools/data/spec_bench/dev.jsonl", "tools/data/spec_bench/LICENSE",
                              "tools/data/spec_bench/README.md"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt},
)
