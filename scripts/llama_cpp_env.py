"""Runs the calling script inside a virtual environment that has llama-cpp-python at a
pinned version, building it there first when needed (PyPI has only the source
distribution: pip compiles llama.cpp with CMake, 30-60 minutes on 2 cores; set
CMAKE_BUILD_PARALLEL_LEVEL to use more)."""
import os
import subprocess
import sys


def ensure(version, packages, venv, cmake_args):
    """Returns when llama_cpp `version` is importable; otherwise makes `venv`, installs
    llama-cpp-python==version and `packages` (pinned requirement strings) there with
    CMAKE_ARGS=cmake_args (unless set), and re-executes the script with its interpreter."""
    try:
        import llama_cpp
        if llama_cpp.__version__ == version:
            return
    except ImportError:
        pass
    py = os.path.join(venv, "bin", "python")
    if os.path.abspath(sys.executable) == os.path.abspath(py):
        sys.exit(f"llama-cpp-python {version} is not importable in {venv}")
    if not os.path.exists(py):
        subprocess.check_call([sys.executable, "-m", "venv", venv])
    env = dict(os.environ)
    env.setdefault("CMAKE_ARGS", cmake_args)
    subprocess.check_call([py, "-m", "pip", "install", "--quiet", f"llama-cpp-python=={version}", *packages], env=env)
    os.execv(py, [py] + sys.argv)
