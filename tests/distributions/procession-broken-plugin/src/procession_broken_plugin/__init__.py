"""A deliberately broken plug-in: one entry point fails to import, one is not a Backend."""


class NotABackend:
    """Registered as a backend, but is not one."""
