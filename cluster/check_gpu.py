"""GPU worker check, run by cluster.yaml (worker_setup_commands) in the container before Ray starts.

The image's torch is built for one CUDA version (torch.version.cuda); the host's NVIDIA driver supports
CUDA up to the version in nvidia-smi's header. An older driver makes every trial on the node fail with
"CUDA driver version is insufficient"; this check fails the node's setup instead, with one line that
says which driver and which build. Strict on the minor version too: CUDA's minor-version compatibility
runs some newer-minor code on an older driver, but not kernels the driver must JIT-compile from PTX.

Stand-alone (torch, nvidia-smi): python cluster/check_gpu.py; exit 0 and one line on success.
"""
import re
import subprocess
import sys

CUDA_IN_HEADER = re.compile(r"CUDA Version\s*:\s*(\d+)\.(\d+)")


def cuda_version(text: str) -> tuple[int, int] | None:
    """'12.8' -> (12, 8); None for anything else."""
    m = re.fullmatch(r"\s*(\d+)\.(\d+)(?:\.\d+)?\s*", text or "")
    return (int(m[1]), int(m[2])) if m else None


def driver_cuda(smi_output: str) -> tuple[int, int] | None:
    """The CUDA version the driver supports, from nvidia-smi's header ('... CUDA Version: 12.4 |')."""
    m = CUDA_IN_HEADER.search(smi_output or "")
    return (int(m[1]), int(m[2])) if m else None


def problem(torch_cuda: str | None, smi_output: str | None, driver_version: str | None) -> str | None:
    """Why torch built for `torch_cuda` cannot use this driver, or None when it can.
    `smi_output`: nvidia-smi's output (None: it is missing or failed); `driver_version`: for the message."""
    if not torch_cuda:
        return "torch is a CPU-only build (torch.version.cuda is None): rebuild the image with a CUDA wheel"
    need = cuda_version(torch_cuda)
    if need is None:
        return f"cannot read torch.version.cuda {torch_cuda!r}"
    if smi_output is None:
        return ("nvidia-smi is missing or failed: no NVIDIA driver on the host, or the container was "
                "started without --gpus all")
    have = driver_cuda(smi_output)
    driver = driver_version or "(version unknown)"
    if have is None:
        return f"cannot read the CUDA version of NVIDIA driver {driver} from nvidia-smi's header"
    if have < need:
        return (f"NVIDIA driver {driver} supports CUDA up to {have[0]}.{have[1]}, but torch was built for "
                f"CUDA {torch_cuda}: use an AMI with a newer driver, or build the image from an older "
                f"cu12x wheel index (cluster/Dockerfile, TORCH_INDEX)")
    return None


def _smi(*args: str) -> str | None:
    try:
        return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=60,
                              check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def main() -> int:
    import torch
    header = _smi()
    versions = _smi("--query-gpu=driver_version", "--format=csv,noheader")
    driver = versions.split()[0] if versions and versions.split() else None
    why = problem(torch.version.cuda, header, driver)
    if why is None and not torch.cuda.is_available():
        why = f"torch {torch.__version__} sees no GPU although driver {driver} supports its CUDA"
    if why is not None:
        print(f"check_gpu: {why}", file=sys.stderr)
        return 1
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    print(f"check_gpu: torch {torch.__version__} (CUDA {torch.version.cuda}), driver {driver}: {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
