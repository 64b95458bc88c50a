"""Hydra configuration files shipped with the package (used by ``srpo-libero``)."""
