"""Training a small MoE language model on real text, with the package's balancing strategies.

``python -m moe_kernels.train`` (or the ``moe-train`` console script) runs it.
"""
