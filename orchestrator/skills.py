"""The orchestrator's view of live skills: what `decide` may dispatch to, and the
planner may plan with."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime

from jetmesh.agents.directory import Directory, LiveAgent, skills_of, visible_to
from jetmesh.agents.spec import SkillSpec

log = logging.getLogger("jetmesh.orchestrator")

VIEW_MAX_AGE_S = 0.2
"""The live skills are recomputed at most this often (or when an agent comes or goes)."""
PLANNER_MAX_AGE_S = 1.0
"""One read of the registry itself serves the plans of this long."""


class LiveSkills:
    """Skills of live agents whose cards verify, from the agent directory, cached
    briefly; with no directory nothing is checked."""

    def __init__(self, directory: Directory | None, now: Callable[[], datetime]) -> None:
        self.directory = directory
        self.now = now
        self.clock: Callable[[], float] = time.monotonic
        self._skills: dict[str, SkillSpec] | None = None
        self.skills_at = 0.0
        self.live_since: dict[str, datetime] = {}
        """When each skill was first seen live by this process (or came back)."""
        self._planner_fresh: tuple[float, list[LiveAgent]] | None = None
        """When the planner last read the registry itself, and the skills it found."""

    @property
    def checked(self) -> bool:
        return self.directory is not None

    def current(self) -> dict[str, SkillSpec] | None:
        """Skills of live agents whose cards verify (None: no registry, no check).

        Recomputed at most every 0.2 s (or when an agent comes or goes): it is asked on
        every decision, and liveness is judged in seconds anyway."""
        if self.directory is None:
            return None
        now = self.clock()
        changed = self.directory.changed.is_set()
        if self._skills is None or now - self.skills_at > VIEW_MAX_AGE_S or changed:
            self._skills, self.skills_at = self.directory.skills(), now
            wall = self.now()
            for sid in self._skills:
                # A step's timeout does not count the time it waited for an agent.
                self.live_since.setdefault(sid, wall)
            for sid in [k for k in self.live_since if k not in self._skills]:
                del self.live_since[sid]
        return self._skills

    def took_change(self) -> bool:
        """Whether an agent came or went since the last call (the ticker asks). The
        cached skills go with the flag, or a drive in the next 0.2 s would still see the
        skills from before the change (and wait for nothing)."""
        if self.directory is None or not self.directory.changed.is_set():
            return False
        self.directory.changed.clear()
        self._skills = None
        return True

    def drop(self) -> None:
        """Recompute the view at the next look."""
        self._skills = None

    async def fresh(self) -> dict[str, SkillSpec] | None:
        """The live skills read from the registry bucket now, not from the view (which
        lags when the loop is saturated); None if there is none or the read failed."""
        if self.directory is None:
            return None
        try:
            return await self.directory.fresh_skills()
        except Exception as e:
            log.warning("registry read failed: %s", e)
            return None

    async def for_planner(self, tenant: str | None = None) -> dict[str, SkillSpec] | None:
        """The skills a plan for a task of `tenant` may use: those of the shared agents
        and of the tenant's own private ones (another tenant's private agent is not
        offered: its skills would be planned and then wait on a subject no agent of
        this tenant serves), from the view and (a model call follows: a read of the
        registry itself is cheap beside it, and a stale view, a saturated loop, must not
        leave skills out of the plan) from a fresh read, at most once a second (it costs
        an ordered consumer on the bucket: 11 messages; once per task it was a tenth of
        a fan-out task's messages)."""
        if self.directory is None:
            return None
        now = time.monotonic()
        if self._planner_fresh is None or now - self._planner_fresh[0] > PLANNER_MAX_AGE_S:
            try:
                fresh = await self.directory.fresh_agents()
            except Exception as e:
                log.warning("registry read failed: %s", e)
                fresh = []
            self._planner_fresh = (now, fresh)
        return {**skills_of(visible_to(self._planner_fresh[1], tenant)),
                **skills_of(visible_to(self.directory.agents(), tenant))}
