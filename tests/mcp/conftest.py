"""Fixtures of the MCP tests (see mcp_support)."""

from mcp_support import fixture_dir, http_server  # noqa: F401
from mesh_fixtures import make_mesh  # noqa: F401
