"""Builds cudnn_flex._C against the installed torch, cuDNN from torch's own nvidia-cudnn package and
the header-only cuDNN frontend from the nvidia-cudnn-frontend package. No system cuDNN is needed."""

import glob
import importlib.metadata as md
import os
from pathlib import Path

from setuptools import find_packages, setup

# torch guesses CUDA_HOME from nvcc on PATH and may pick /usr/local; the toolkit's own dir is right.
if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/include/cuda_runtime_api.h").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils.cpp_extension import BuildExtension, CUDAExtension  # noqa: E402  (reads CUDA_HOME)


def package_dir(dist: str, relative: str) -> Path:
    """A folder shipped inside an installed wheel, found without importing the package."""
    try:
        path = Path(md.distribution(dist).locate_file(relative))
    except md.PackageNotFoundError as e:
        raise SystemExit(f"cudnn_flex: building needs the pip package {dist}; install it first "
                         f"(scripts/install.sh does)") from e
    if not path.exists():
        raise SystemExit(f"cudnn_flex: {dist} is installed but has no {relative}")
    return path


def cudnn_dir() -> Path:
    for dist in ("nvidia-cudnn-cu13", "nvidia-cudnn-cu12"):
        try:
            return package_dir(dist, "nvidia/cudnn")
        except SystemExit:
            continue
    raise SystemExit("cudnn_flex: building needs torch's cuDNN wheel (nvidia-cudnn-cu13 or -cu12)")


frontend_include = package_dir("nvidia-cudnn-frontend", "include")
cudnn = cudnn_dir()
cuda_extra_includes = [str(p) for p in (package_dir("torch", "torch").parent / "nvidia").glob("cu*/include")]
libcudnn = sorted(glob.glob(str(cudnn / "lib" / "libcudnn.so*")))
if not libcudnn:
    raise SystemExit(f"cudnn_flex: no libcudnn.so* in {cudnn / 'lib'}")


def shared_library(name: str) -> Path:
    """`name` (e.g. libnvrtc.so) from torch's CUDA wheels, else from the CUDA toolkit."""
    nvidia = package_dir("torch", "torch").parent / "nvidia"
    candidates = sorted(nvidia.glob(f"cu*/lib/{name}*")) + sorted(nvidia.glob(f"*/lib/{name}*"))
    cuda_home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    candidates += sorted((cuda_home / "lib64").glob(f"{name}*"))
    found = [p for p in candidates if p.name.startswith(name + ".") and p.name[len(name) + 1:].isdigit()]
    if not found:
        raise SystemExit(f"cudnn_flex: no {name}.N in torch's nvidia wheels or {cuda_home / 'lib64'}")
    return found[0]


# The cuDNN frontend calls NVRTC (for its runtime-compiled engines); link the one torch ships.
libnvrtc = shared_library("libnvrtc.so")

setup(
    name="cudnn_flex",
    version="0.1.0",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[
        CUDAExtension(
            name="cudnn_flex._C",
            sources=sorted(str(p) for p in Path("csrc").glob("*.cpp")),
            include_dirs=[str(Path("csrc").resolve()), str(frontend_include), str(cudnn / "include")],
            # CUDA's own include dir comes first; the pip CUDA headers only fill gaps.
            extra_compile_args={"cxx": ["-std=c++20", "-O2", "-Wno-deprecated-declarations",
                                        *(f"-idirafter{p}" for p in cuda_extra_includes)]},
            # Link the soname torch itself loads, and find it beside torch at run time.
            extra_link_args=[f"-L{cudnn / 'lib'}", "-l:" + Path(libcudnn[0]).name,
                             f"-Wl,-rpath,{cudnn / 'lib'}",
                             f"-L{libnvrtc.parent}", "-l:" + libnvrtc.name, f"-Wl,-rpath,{libnvrtc.parent}"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
)
