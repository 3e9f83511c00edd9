"""nexus-proxy: a local reverse proxy that adds the Quantoz Nexus API key to every request."""

__version__ = "0.1.0"

__all__ = ["__version__"]
