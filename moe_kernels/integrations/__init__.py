"""Drop-ins of this package's fused MoE for other libraries' models."""
