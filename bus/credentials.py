"""The NATS credentials of a `jetmesh up` mesh, as its data directory keeps them.

`jetmesh up` (and `jetmesh nats-config`) write `nats-auth.conf` (the server's
`authorization` section) and `nats-auth.env` (each role's NATS_USER / NATS_PASSWORD /
NATS_INBOX_PREFIX block, mode 0600) into the data directory; processes that log in as a
role of that mesh (the CLI's commands, the dashboard's approver login) read their block
here. Writing them is the CLI's (`jetmesh.orchestrator.cli.nats_config`).
"""

from __future__ import annotations

import re
from pathlib import Path

_ANY_ENV_LINE = re.compile(r"^(NATS_[A-Z_]+)=(.*)$")

AUTH_CONF = "nats-auth.conf"
"""In a data directory: the server's `authorization` section (`jetmesh up`)."""
AUTH_ENV = "nats-auth.env"
"""In a data directory: every role's NATS_USER / NATS_PASSWORD / NATS_INBOX_PREFIX."""
CREDENTIAL_VARS = ("NATS_USER", "NATS_PASSWORD", "NATS_INBOX_PREFIX")
AUTH_ENV_VAR = "JETMESH_NATS_AUTH_ENV"
"""Path of a `nats-auth.env` to take the running role's credentials from (default: the
one in the data directory)."""


def read_env_blocks(env_file: Path) -> dict[str, dict[str, str]]:
    """User -> its block's NATS_* variables, from an env file this module wrote."""
    blocks: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    if not env_file.exists():
        return blocks
    for line in env_file.read_text().splitlines():
        m = _ANY_ENV_LINE.match(line.strip())
        if not m:
            continue
        name, value = m.group(1), m.group(2)
        if name == "NATS_USER":
            current = {}
            blocks[value] = current
        current[name] = value
    return blocks


def credentials_in(data_dir: Path, user: str) -> dict[str, str] | None:
    """The NATS_* variables of `user` from a `jetmesh up` data directory, if it has them."""
    return read_env_blocks(data_dir / AUTH_ENV).get(user)
