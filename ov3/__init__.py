"""ov3: OpenVision 3-style unified vision encoders in JAX/Flax."""

__version__ = "0.1.0"
