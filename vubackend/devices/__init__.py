"""vubackend.devices: ready devices built only on the public API.

* :class:`RngDevice`: virtio-rng from the kernel's random source.
"""

from vubackend.devices._rng import RngDevice

__all__ = ["RngDevice"]
