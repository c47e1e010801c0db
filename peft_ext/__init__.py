"""peft_ext: int8 and sparse drop-in Linear layers backed by C++/CUDA kernels.

    report = peft_ext.patch(model)      # int8 W8A8 on every Linear but the head
    peft_ext.prune(model, 0.5, "2:4")   # prune in place (masks kept in training)
    print(report)
    peft_ext.unpatch(model)             # plain nn.Linear back
"""
from . import _library  # noqa: F401  (checks the build, loads _C; first on purpose)
from . import distill, ops
from .distill import DistillationLoss, FusedLinearDistillationLoss
from .nn import Int8Linear, SparseLinear
from .offload import OffloadPlan, Offloader, offload
from .patch import PatchReport, patch, unpatch
from .prefetch import Prefetcher
from .prune import PruneReport, prune

__version__ = "0.1.0"

__all__ = ["DistillationLoss", "FusedLinearDistillationLoss", "Int8Linear", "OffloadPlan", "Offloader",
           "PatchReport", "Prefetcher", "PruneReport", "SparseLinear", "distill", "offload", "ops", "patch",
           "prune", "unpatch", "__version__"]

# Last, once the package is complete: registers the transformers quantizer and
# teaches HF peft our layers when those libraries get imported (or now, if they
# already are); no import otherwise.
from .integrations import _lazy  # noqa: E402

_lazy.on_import("transformers", "peft_ext.integrations.transformers")
_lazy.on_import("peft", "peft_ext.integrations.peft")  # peft: seconds to import, optional
