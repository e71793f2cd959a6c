"""pclease: a Polars Cloud compute-lease broker."""

__version__ = "0.1.0"
