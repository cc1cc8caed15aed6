"""Client for the memcr daemon: the wire protocol and a small typed API.

It does not import the memcr engine, so it installs alone into an
unprivileged container.
"""

from memcr_client.client import (
    CMD_CHECKPOINT,
    CMD_RESTORE,
    RESP_ERROR,
    RESP_INVALID_PID,
    RESP_OK,
    Client,
    MemcrClientError,
)

__all__ = [
    "CMD_CHECKPOINT",
    "CMD_RESTORE",
    "RESP_ERROR",
    "RESP_INVALID_PID",
    "RESP_OK",
    "Client",
    "MemcrClientError",
]
