"""Who may register shared memory with an rtface server: only processes on the server's host.

When the server listens beyond loopback, ``make serve`` restricts Triton's shared-memory API to
requests carrying the header ``rtface-shm-token: <token>`` (over gRPC Triton reads it as
``triton-grpc-protocol-rtface-shm-token``), and writes the random token to a
file only the server's user can read on the server's host (:func:`token_path`). A local client
of the same user reads it and sends it with its (un)registration calls; a remote client cannot,
so it cannot make the server map memory — it gets gRPC only.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["TOKEN_HEADER", "token_path", "read_token", "shm_headers"]

TOKEN_HEADER = "rtface-shm-token"
GRPC_PREFIX = "triton-grpc-protocol-"  # Triton expects restricted-protocol headers under this prefix


def token_path(grpc_port: int) -> Path:
    """Where the server on ``grpc_port`` keeps its token: a private per-user directory."""
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/rtface-{os.getuid()}"
    return Path(base) / f"rtface-shm-token-{grpc_port}"


def read_token(grpc_port: int) -> str | None:
    """The token of the local server on ``grpc_port``, if this process can read one."""
    try:
        return token_path(grpc_port).read_text().strip() or None
    except OSError:
        return None


def shm_headers(grpc_port: int) -> dict[str, str] | None:
    """gRPC headers for shared-memory calls to the local server on ``grpc_port``."""
    token = read_token(grpc_port)
    return {GRPC_PREFIX + TOKEN_HEADER: token} if token else None
