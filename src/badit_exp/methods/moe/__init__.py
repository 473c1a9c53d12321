"""The mixture-of-LoRA kit and the mixture methods built on it.

* :mod:`.routers`: one small class per router (sequence, token, dense, scalar), chosen by name.
* :mod:`.routing`: the routing context and the one forward pre-hook that fills it (GainLoRA's
  gates use it too).
* :mod:`.layer`: the fused mixture layer (expert layouts ``separate`` and ``shared_a``, a
  per-layer K), a plain LoRA layer, and the injection helpers (a Linear or a whole block).
* :mod:`.loramoe`: LoRAMoE, the base class of every mixture method (``MoLoRA``).
* :mod:`.hydralora`, :mod:`.mola`, :mod:`.mixlora`: the methods of the same name.
* :mod:`.rankwise`: each rank an expert: the rank-gated layout (one A, one B, an r-length gate),
  the bias balancer, and the base of :mod:`.flylora` and :mod:`.smora` (rank routers
  ``implicit`` and ``rank`` in :mod:`.routers`).

A new mixture method is one subclass of :class:`MoLoRAConfig` / :class:`MoLoRA` (its defaults
and, if needed, its ``make_layer``) plus one YAML.
"""

from badit_exp.methods.moe import flylora, hydralora, mixlora, mola, smora  # noqa: F401,E402
from badit_exp.methods.moe.loramoe import MoLoRA, MoLoRAConfig, balance_loss  # noqa: F401
