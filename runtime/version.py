"""The runtime's version: its own module, so ``core`` can read it without importing its package."""

__version__ = "0.1.0"
