"""The dashboard: tasks, approvals, agents, dead letters and stats in a browser.

Served by the gateway at ``/ui`` (`mount`); the page is plain JavaScript shipped in
``static/`` (no build step, no CDN). See `api` for the HTTP API and `auth` for logins.
"""

from __future__ import annotations

from starlette.routing import Mount

from jetmesh.agents.registry import Registry
from jetmesh.orchestrator.client import Client

from .api import Dashboard, DashboardSettings

__all__ = ["Dashboard", "DashboardSettings", "mount"]

PATH = "/ui"


def mount(client: Client, registry: Registry, settings: DashboardSettings | None = None
          ) -> Mount:
    """The dashboard's route for the gateway's app (its projector and index start in
    the running loop, if there is one, else on the first request)."""
    dash = Dashboard(client, registry, settings)
    dash.start_soon()
    return Mount(PATH, app=dash.app, name="ui")
