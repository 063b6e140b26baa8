"""Shipped model configs (``*.json``, package data), read by :func:`ellava_lib.structure.load_config`."""
