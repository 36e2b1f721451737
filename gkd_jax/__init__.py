"""gkd_jax: Generalized Knowledge Distillation (Agarwal et al., ICLR 2024) in JAX/Flax."""

__version__ = "0.1.0"
