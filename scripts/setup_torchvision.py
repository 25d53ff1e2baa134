"""Install the torchvision CPU shim into the current environment, only where it is needed.

Run by `make setup` after pip. If `import torchvision` works on its own (a CUDA install, or a
future CPU build of torchvision) the shim is not installed, and removed if an earlier setup left
it. If it fails with the known "torchvision::nms does not exist" error, the shim is installed and
the import is checked again. Idempotent.
"""
import pathlib
import shutil
import subprocess
import sys
import sysconfig

HERE = pathlib.Path(__file__).resolve().parent
SITE = pathlib.Path(sysconfig.get_paths()["purelib"])
SHIM, HOOK = SITE / "_tv_cpu_shim.py", SITE / "zz_tv_cpu_shim.pth"
KNOWN_FAILURE = "torchvision::nms does not exist"


def torchvision_import_error():
    """'' if torchvision imports in a fresh interpreter, else its stderr."""
    done = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    return "" if done.returncode == 0 else done.stderr


def main():
    HOOK.unlink(missing_ok=True)  # judge torchvision on its own first
    error = torchvision_import_error()
    if not error:
        SHIM.unlink(missing_ok=True)
        print("torchvision imports on its own: no CPU shim needed")
        return
    if KNOWN_FAILURE not in error:
        sys.exit(f"torchvision fails to import for an unknown reason:\n{error}")
    shutil.copy(HERE / "_tv_cpu_shim.py", SHIM)
    HOOK.write_text("import _tv_cpu_shim; _tv_cpu_shim.install()\n")
    error = torchvision_import_error()
    if error:
        sys.exit(f"torchvision still fails to import with the CPU shim:\n{error}")
    print(f"torchvision is a CUDA build next to a CPU torch: installed the CPU shim in {SITE}")


if __name__ == "__main__":
    main()
