"""memcr: checkpoint and restore the memory of a live Linux process."""

__version__ = "0.1.0"
