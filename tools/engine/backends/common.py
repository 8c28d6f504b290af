"""What every detector backend shares: the error a build step raises."""

from __future__ import annotations

__all__ = ["BackendError"]


class BackendError(RuntimeError):
    """A backend cannot build or check its artifact; the message says why and what to do, in one line."""
