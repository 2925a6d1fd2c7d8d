"""A node's identity without TLS: a random secret it joins with, so nobody else can take its id while it lives.

The coordinator keeps a hash of the secret per node id and refuses a join under the id of a live node
with another secret (coordinator/core.py). The secret is kept in the node's ``--state-dir`` (0600) when
it has one, so a restarted node is the same node; without one it lives as long as the process (a node
restarted under the same ``--node-id`` then waits for its old lease to end). With TLS the certificate
is the identity (protocols/tls.py) and the secret is not used.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

logger = logging.getLogger(__name__)

SECRET_FILE = "node.secret"
SECRET_BYTES = 32


def node_secret(state_dir: str = "") -> bytes:
    """The secret this node joins with: the one in ``state_dir`` (made there on first use), else a new one."""
    if not state_dir:
        return secrets.token_bytes(SECRET_BYTES)
    path = Path(state_dir) / SECRET_FILE
    try:
        secret = path.read_bytes()
        if len(secret) == SECRET_BYTES:
            return secret
        logger.warning("%s holds %d bytes, not %d: making a new node secret", path, len(secret), SECRET_BYTES)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ValueError(f"cannot read the node secret {path}: {exc.strerror}") from exc
    secret = secrets.token_bytes(SECRET_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    os.replace(tmp, path)
    return secret
