"""peft_ext: int8 drop-in Linear layers backed by C++/CUDA kernels.

    report = peft_ext.patch(model)      # int8 W8A8 on every Linear but the head
    print(report)
    peft_ext.unpatch(model)             # plain nn.Linear back
"""
from . import ops
from .nn import Int8Linear
from .patch import PatchReport, patch, unpatch
from .prefetch import Prefetcher
from .offload import offload

__version__ = "0.1.0"

__all__ = ["Int8Linear", "PatchReport", "Prefetcher", "offload", "ops", "patch", "unpatch", "__version__"]
