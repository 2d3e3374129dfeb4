"""Builds slimfit._C: C++ kernels always, CUDA kernels when torch has CUDA and a toolkit is found.

torch must already be installed: build with ``pip install --no-build-isolation .``.
Environment: SLIMFIT_CUDA=0 skips the CUDA sources, SLIMFIT_CUDA=1 makes a missing toolkit an error;
SLIMFIT_SANITIZE=address builds the C++ kernels with AddressSanitizer (run with libasan preloaded).
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit(
        "slimfit: torch is not importable in the build environment. Install torch first, then build against it "
        "with `pip install --no-build-isolation .` (an isolated build would compile against a different torch)."
    )


def cuda_include_dirs() -> list[str]:
    """CUDA headers shipped in the nvidia wheels torch depends on (cusparse.h and friends)."""
    try:
        import nvidia
    except ImportError:
        return []
    return [d for root in nvidia.__path__ for d in glob.glob(os.path.join(root, "cu*", "include"))]


def want_cuda() -> bool:
    choice = os.environ.get("SLIMFIT_CUDA", "auto")
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if choice == "1" and not available:
        sys.exit(
            f"slimfit: SLIMFIT_CUDA=1 but torch.version.cuda={torch.version.cuda!r} and "
            f"CUDA_HOME={cpp_extension.CUDA_HOME!r}; install a CUDA build of torch and set CUDA_HOME."
        )
    return available and choice != "0"


def extension():
    cxx_flags = ["-O3", "-ffp-contract=off", "-fopenmp"]
    link_flags = ["-fopenmp"]
    sanitizer = os.environ.get("SLIMFIT_SANITIZE")
    if sanitizer:
        cxx_flags += [f"-fsanitize={sanitizer}", "-fno-omit-frame-pointer", "-g"]
        link_flags += [f"-fsanitize={sanitizer}"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    kwargs = dict(
        name="slimfit._C",
        extra_link_args=link_flags,
        py_limited_api=True,
        define_macros=[("Py_LIMITED_API", "0x030A0000")],
    )
    if want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc_flags = ["-O3", "--fmad=false", "-lineinfo"]
        return cpp_extension.CUDAExtension(
            sources=sources,
            include_dirs=cuda_include_dirs(),
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            **kwargs,
        )
    return cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **kwargs)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
