"""Drop-in integrations with other libraries (each imports its library lazily)."""

from .transformers import PatchReport, patch, patched, register, unpatch

__all__ = ["PatchReport", "patch", "patched", "register", "unpatch"]
