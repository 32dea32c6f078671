"""nemo_dvpo: Decoupled Value Policy Optimization on megatron-core."""

from nemo_dvpo.utils import cpu_runtime as _cpu_runtime

# First, before torch is imported: an entry point of ours runs again with tcmalloc and Intel's OpenMP preloaded where
# the machine has them (nemo_dvpo/utils/cpu_runtime.py says why); every other importer is left as it is.
_cpu_runtime.preload_for_entry_point()

from nemo_dvpo.utils import cpu_compat as _cpu_compat  # noqa: E402

__version__ = "0.1.0"

# On machines without CUDA, megatron-core needs a few redirections to run on CPU (gloo).
# This is a no-op when CUDA is present.
_cpu_compat.apply()
