"""``python -m spinal_ops``: what this installation is and which backends it runs."""
from .about import info

info()
