"""Builds the single extension module ``moe_kernels._C`` with CMake and ninja.

The module always holds the native CPU kernels. The CUDA kernels join it when a CUDA build of
torch and a CUDA toolkit (``nvcc``) are both present, or when ``MOE_KERNELS_CUDA=1`` forces
them (``MOE_KERNELS_CUDA=0`` forces a CPU-only build). ``TORCH_CUDA_ARCH_LIST`` picks the GPU
architectures (default "8.0;9.0+PTX": machine code for Ampere and Hopper, and PTX that newer GPUs
compile at load time); no GPU is ever queried at build time, so the CUDA variant
builds on machines without one. ``MOE_KERNELS_SANITIZE=address,shift,bounds`` (gcc's
-fsanitize names: address, undefined or some of its checks) builds the host code with
AddressSanitizer and UndefinedBehaviorSanitizer, so that kernels run on the CPU emulator are
checked for out-of-bounds accesses and undefined behaviour (``make test-asan``).

The build imports torch, so install with ``pip install --no-build-isolation -e .``.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def find_cuda_home() -> Path | None:
    """The toolkit root: the folder whose bin/nvcc is the compiler and include/ has the runtime.

    `nvcc` on PATH may be a wrapper script elsewhere, so its parent is only one candidate.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for candidate in candidates:
        if not candidate:
            continue
        root = Path(candidate)
        if (root / "bin" / "nvcc").is_file() and (root / "include" / "cuda_runtime.h").is_file():
            return root
    return None


def cmake_cuda_architectures(arch_list: str) -> str:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX", "9.0a") in CMake's CUDA_ARCHITECTURES spelling."""
    archs = []
    for item in re.split(r"[;\s]+", arch_list.strip()):
        if not item:
            continue
        base = item.removesuffix("+PTX")
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)", base)
        if match is None:
            raise SystemExit(
                f"TORCH_CUDA_ARCH_LIST: cannot parse '{item}' (expected e.g. 8.0, 9.0a, 9.0+PTX)"
            )
        sm = "".join(match.groups())
        archs.append(f"{sm}-real")
        if item.endswith("+PTX"):
            archs.append(f"{sm}-virtual")
    if not archs:
        raise SystemExit("TORCH_CUDA_ARCH_LIST is empty")
    return ";".join(archs)


def wheel_include_dirs(site_packages: Path) -> list[Path]:
    """Headers that torch's `nvidia-*` wheels carry (cuBLAS for ATen's CUDA headers, NVTX3, NCCL)."""
    found = glob.glob(str(site_packages / "nvidia" / "*" / "include"))
    return sorted(Path(p) for p in found)


def find_nccl_library(site_packages: Path) -> Path | None:
    """libnccl.so.2 of torch's nvidia-nccl wheel (the wheel has no libnccl.so)."""
    found = sorted(glob.glob(str(site_packages / "nvidia" / "nccl" / "lib" / "libnccl.so*")))
    return Path(found[0]) if found else None


def find_nvtx_include(dirs: list[Path]) -> Path | None:
    for d in dirs:
        if (d / "nvtx3" / "nvtx3.hpp").is_file():
            return d
    return None


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch

        torch_root = Path(torch.__file__).resolve().parent
        site_packages = torch_root.parent
        cuda_home = find_cuda_home()
        forced = os.environ.get("MOE_KERNELS_CUDA", "").strip()
        if forced not in ("", "0", "1"):
            raise SystemExit(f"MOE_KERNELS_CUDA must be 0 or 1, got '{forced}'")
        if forced == "1":
            if torch.version.cuda is None:
                raise SystemExit("MOE_KERNELS_CUDA=1 but the installed torch is a CPU-only build")
            if cuda_home is None:
                raise SystemExit("MOE_KERNELS_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        with_cuda = forced == "1" or (
            forced == "" and torch.version.cuda is not None and cuda_home is not None
        )

        include_dirs = wheel_include_dirs(site_packages)
        if cuda_home is not None:
            include_dirs.append(cuda_home / "include")
        nvtx_include = find_nvtx_include(include_dirs)
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_CUDA_ARCHS

        sanitize = os.environ.get("MOE_KERNELS_SANITIZE", "").strip()
        sanitizers = [name for name in sanitize.split(",") if name]
        known = ("address", "undefined", "shift", "bounds", "signed-integer-overflow")
        if any(name not in known for name in sanitizers):
            raise SystemExit(
                f"MOE_KERNELS_SANITIZE must name some of {', '.join(known)}; got '{sanitize}'"
            )
        variant = ("cuda" if with_cuda else "cpu") + "".join(f"-{name}" for name in sanitizers)
        build_dir = (
            ROOT / "build" / f"cmake-{variant}-py{sys.version_info.major}{sys.version_info.minor}"
        )
        output_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        tool_bins = [Path(sys.executable).parent]
        cmake = shutil.which("cmake", path=os.pathsep.join(map(str, tool_bins))) or shutil.which(
            "cmake"
        )
        ninja = shutil.which("ninja", path=os.pathsep.join(map(str, tool_bins))) or shutil.which(
            "ninja"
        )
        if cmake is None or ninja is None:
            raise SystemExit("the build needs cmake>=3.28 and ninja: pip install cmake ninja")

        args = [
            cmake,
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-G",
            "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('MOE_KERNELS_BUILD_TYPE', 'Release')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DTORCH_ROOT={torch_root}",
            f"-DTORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DMOE_KERNELS_OUTPUT_DIR={output_dir}",
            f"-DMOE_KERNELS_EXTRA_INCLUDES={';'.join(map(str, include_dirs))}",
            f"-DMOE_KERNELS_NVTX={'ON' if nvtx_include else 'OFF'}",
            f"-DMOE_KERNELS_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DMOE_KERNELS_SANITIZERS={';'.join(sanitizers)}",
        ]
        nccl = find_nccl_library(site_packages) if with_cuda else None
        if with_cuda:
            args += [
                f"-DMOE_KERNELS_NCCL_LIBRARY={nccl or ''}",
                f"-DCMAKE_CUDA_COMPILER={cuda_home / 'bin' / 'nvcc'}",
                f"-DCUDAToolkit_ROOT={cuda_home}",
                f"-DCMAKE_CUDA_ARCHITECTURES={cmake_cuda_architectures(arch_list)}",
                # Commas: a ';' would split the value into a CMake list.
                "-DMOE_KERNELS_CUDA_ARCH_LIST=" + ",".join(re.split(r"[;\s]+", arch_list)),
            ]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(args, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)

        summary = "\n".join(
            [
                "moe_kernels build summary",
                f"  variant      : {variant}"
                + (f" (forced by MOE_KERNELS_CUDA={forced})" if forced else " (auto)"),
                f"  torch        : {torch.__version__} (CUDA {torch.version.cuda})",
                f"  CUDA toolkit : {cuda_home if with_cuda else '-'}",
                f"  CUDA archs   : {arch_list if with_cuda else '-'}",
                f"  NCCL         : {nccl or '-'}",
                f"  NVTX ranges  : {'on' if nvtx_include else 'off (nvtx3 headers not found)'}",
                f"  build tree   : {build_dir}",
                f"  module       : {self.get_ext_fullpath(ext.name)}",
            ]
        )
        print(summary, file=sys.stderr)
        (ROOT / "build").mkdir(exist_ok=True)
        (ROOT / "build" / "summary.txt").write_text(summary + "\n")


setup(
    ext_modules=[Extension("moe_kernels._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
