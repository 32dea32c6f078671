"""nemo_dvpo: Decoupled Value Policy Optimization on megatron-core."""

from nemo_dvpo.utils import cpu_compat as _cpu_compat

__version__ = "0.1.0"

# On machines without CUDA, megatron-core needs a few redirections to run on CPU (gloo).
# This is a no-op when CUDA is present.
_cpu_compat.apply()
