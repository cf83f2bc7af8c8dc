"""vubackend.vring: see docs/design.md for what this layer holds."""

__all__: list[str] = []
