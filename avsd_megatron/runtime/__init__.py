"""What the trainer itself needs to run Megatron-Core on a machine without CUDA: reversible CPU patches (gloo).

| module         | what it holds                                                                              |
|----------------|--------------------------------------------------------------------------------------------|
| `megatron_cpu` | `install()` / `megatron_on_cpu()`: Megatron-Core's CUDA-assuming calls redirected to CPU     |

`python -m avsd_megatron train` installs them when `torch.cuda.is_available()` is false; the test helpers
(`testing/`) do the same inside launched ranks. Importing this package patches nothing.
"""

from avsd_megatron.runtime.megatron_cpu import install, is_installed, megatron_on_cpu

__all__ = ["install", "is_installed", "megatron_on_cpu"]
