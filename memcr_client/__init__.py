"""Client for the memcr daemon: the wire protocol and a small typed API.

It does not import the memcr engine and needs nothing beyond Python, so it
installs alone (`pip install ./memcr_client`, the memcr-py-client
distribution) into an unprivileged container. The wire format itself is
in memcr_client.protocol.
"""

from memcr_client.client import Client, MemcrClientError
from memcr_client.protocol import (
    CMD_CHECKPOINT,
    CMD_RESTORE,
    DEFAULT_LOCATION,
    LOCATION_ENV,
    RESP_ERROR,
    RESP_INVALID_PID,
    RESP_OK,
    Address,
    AddressError,
    Answer,
    Command,
    Compression,
    Dialect,
    ExitCode,
    ProtocolError,
)

__version__ = "0.1.0"

__all__ = [
    "CMD_CHECKPOINT",
    "CMD_RESTORE",
    "DEFAULT_LOCATION",
    "LOCATION_ENV",
    "RESP_ERROR",
    "RESP_INVALID_PID",
    "RESP_OK",
    "Address",
    "AddressError",
    "Answer",
    "Client",
    "Command",
    "Compression",
    "Dialect",
    "ExitCode",
    "MemcrClientError",
    "ProtocolError",
]
