"""flash-plugin: sample-adaptive reconstruction with diffusion models."""
