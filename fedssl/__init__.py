"""fedssl: federated self-supervised pre-training of vision encoders for weak clients."""

__version__ = "0.1.0"
