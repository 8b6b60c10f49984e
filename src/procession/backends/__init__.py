"""Backends: one module per backend, each implementing :class:`procession.Backend`."""
