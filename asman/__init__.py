"""Asman: public compute queues on a shared log."""

__version__ = "0.1.0"
