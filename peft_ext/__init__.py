"""peft_ext: int8 and sparse drop-in Linear layers backed by C++/CUDA kernels.

    report = peft_ext.patch(model)      # int8 W8A8 on every Linear but the head
    peft_ext.prune(model, 0.5, "2:4")   # prune in place (masks kept in training)
    print(report)
    peft_ext.unpatch(model)             # plain nn.Linear back
"""
from . import ops
from .integrations.hooks import when_imported as _when_imported
from .nn import Int8Linear, SparseLinear
from .offload import OffloadPlan, Offloader, offload
from .patch import PatchReport, patch, unpatch
from .prefetch import Prefetcher
from .prune import PruneReport, prune

__version__ = "0.1.0"

# HF peft (optional, slow to import) learns our layers once it is imported.
_when_imported("peft", "peft_ext.integrations.peft", "register")

__all__ = ["Int8Linear", "OffloadPlan", "Offloader", "PatchReport", "Prefetcher", "PruneReport", "SparseLinear",
           "offload", "ops", "patch", "prune", "unpatch", "__version__"]
