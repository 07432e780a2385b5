"""The fused MoE ops in Hugging Face transformers models, in one line.

    from moe_kernels.integrations.transformers import patch, LossFreeBalancingCallback

    patch(model)                            # same outputs, on the fused ops
    patch(model, balancing="loss_free")     # and loss-free balancing while fine-tuning
    Trainer(model, ..., callbacks=[LossFreeBalancingCallback()])

Needs ``pip install moe_kernels[transformers]``.
"""

try:
    import transformers  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "moe_kernels.integrations.transformers needs transformers: "
        "pip install 'moe_kernels[transformers]'"
    ) from error

from .balancing import LossFreeBalancingCallback, moe_routers, update_balance
from .patch import patch, unpatch
from .routing import ROUTERS, supported_routers

__all__ = [
    "ROUTERS",
    "LossFreeBalancingCallback",
    "moe_routers",
    "patch",
    "supported_routers",
    "unpatch",
    "update_balance",
]
