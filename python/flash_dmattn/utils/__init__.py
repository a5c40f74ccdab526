"""flash_dmattn.utils: helpers shared by the backends (mask building)."""
from .mask import create_mask

__all__ = ["create_mask"]
