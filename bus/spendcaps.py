"""Budgets over time: daily and monthly dollar caps per tenant and per user, across all
their tasks, reserved before each model call like task budgets (bus.budgets).

One KV entry per (scope, who, period) in `jm-spend` holds what was spent and what calls
in flight reserved; each change is a compare-and-set on the entry's revision, so every
replica of every agent draws from the same cap and a call whose upper-bound estimate
does not fit is refused before it is made: the cap is never exceeded, whatever the
concurrency (a settled cost never exceeds its reservation: the estimate is an upper
bound). A call reserves on every counter that has a cap, in one fixed order; a refusal
releases what it had reserved.

Alerts: the settlement that first takes a counter's spend to `alert_share` of its cap
sets the counter's `alerted` flag in the same compare-and-set, so exactly one call,
in one replica, reports it (a `BudgetAlerted` event on its step, the webhook when one is
configured, and the OTel counter `jetmesh.spend.alerts` with the tenant, or the user's
key token, and the period as attributes: exported by the process's meter provider, e.g.
under `opentelemetry-instrument`; a no-op without one). A crash between the two loses
that alert (at most once).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import httpx
import yaml
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from opentelemetry import metrics
from pydantic import BaseModel, ConfigDict, Field

from jetmesh.bus import headers as hn
from jetmesh.bus import subjects
from jetmesh.bus.budgets import BudgetRefused, parse_counter
from jetmesh.bus.presence import ensure_bucket

log = logging.getLogger(__name__)

Scope = Literal["tenant", "user"]
Period = Literal["day", "month"]
ADJECTIVE = {"day": "daily", "month": "monthly"}
ALERTS_METRIC = "jetmesh.spend.alerts"
"""The counter of spend alerts (attributes `jetmesh.spend.scope`, `jetmesh.tenant` or
`jetmesh.user`, `jetmesh.spend.period`)."""


class Cap(BaseModel):
    """Dollar caps of one tenant or user (None: no cap for that period)."""

    model_config = ConfigDict(extra="forbid")

    daily_usd: float | None = Field(default=None, ge=0)
    monthly_usd: float | None = Field(default=None, ge=0)


class SpendCaps(BaseModel):
    """The caps in force (YAML/JSON file `JETMESH_SPEND_CAPS_FILE`)."""

    model_config = ConfigDict(extra="forbid")

    tenants: dict[str, Cap] = Field(default_factory=dict)
    """Tenant id -> its caps, over all its tasks."""
    users: dict[str, Cap] = Field(default_factory=dict)
    """User id -> their caps, over all their tasks (in any tenant)."""
    alert_share: float = Field(default=0.8, gt=0, le=1)
    """Alert once when a counter's spend reaches this share of its cap."""
    webhook_url: str | None = None
    """POSTed each alert as JSON (optional)."""

    @classmethod
    def load(cls, path: Path) -> SpendCaps:
        return cls.model_validate(yaml.safe_load(path.read_text()) or {})

    def counters(self, tenant: str | None, user: str | None, now: datetime
                 ) -> list[tuple[str, Scope, str, Period, float]]:
        """(key, scope, who, period, cap) of every capped counter a call draws from, in
        the fixed order reservations take them."""
        out: list[tuple[str, Scope, str, Period, float]] = []
        scopes: list[tuple[Scope, str | None, Cap | None]] = [
            ("tenant", tenant, self.tenants.get(tenant) if tenant else None),
            ("user", user, self.users.get(user) if user else None)]
        for scope, who, cap in scopes:
            if who is None or cap is None:
                continue
            for period, limit in (("day", cap.daily_usd), ("month", cap.monthly_usd)):
                if limit is not None:
                    p: Period = "day" if period == "day" else "month"
                    out.append((spend_key(scope, who, p, now), scope, who, p, limit))
        return out


def period_token(period: Period, now: datetime) -> str:
    """`d20261204` / `m202612` (UTC)."""
    now = now.astimezone(UTC)
    return now.strftime("d%Y%m%d") if period == "day" else now.strftime("m%Y%m")


def who_token(who: str) -> str:
    """`who` as one key token (ids that are not tokens, e.g. e-mail addresses, hashed)."""
    try:
        return subjects.check_id(who)
    except subjects.InvalidIdError:
        return "h-" + hashlib.sha256(who.encode()).hexdigest()[:24]


def spend_key(scope: Scope, who: str, period: Period, now: datetime) -> str:
    return subjects.spend_key(scope, who_token(who), period_token(period, now))


class SpendCounter(BaseModel):
    model_config = ConfigDict(extra="forbid")  # see BudgetUsage

    spent_usd: float = 0.0
    reserved: dict[str, float] = Field(default_factory=dict)
    """Reservation id -> dollars of a call in flight."""
    alerted: bool = False
    """The alert at the configured share was given (once per counter)."""

    @property
    def reserved_usd(self) -> float:
        return sum(self.reserved.values())


class SpendAlert(BaseModel):
    """A counter's spend reached the alert share of its cap (given once)."""

    scope: Scope
    who: str
    period: Period
    key: str
    cap_usd: float
    share: float
    spent_usd: float
    task_id: str | None = None
    step_id: str | None = None
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True)
class SpendReservation:
    id: str
    usd: float
    counters: tuple[tuple[str, Scope, str, Period, float], ...]


@dataclass
class SpendBook:
    """Compare-and-set reservations on the tenant and user period counters."""

    js: JetStreamContext
    caps: SpendCaps
    replicas: int = 1
    attempts: int = 400
    meter: metrics.Meter | None = None
    """Where `jetmesh.spend.alerts` is counted (None: the global meter provider's)."""
    _kv: KeyValue | None = field(default=None, init=False)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict, init=False)
    _last: dict[str, tuple[SpendCounter, int]] = field(default_factory=dict, init=False)
    """Each counter as this process last wrote it, with its revision: the next update
    tries that revision first and reads only when someone else wrote since."""
    """One update per counter at a time in this process: the calls of one process queue
    here instead of racing each other's compare-and-set (at 1,000 concurrent tasks on
    one counter the races alone took past the steps' time limits); replicas in other
    processes still race, and lose only to each other."""

    def __post_init__(self) -> None:
        meter = self.meter or metrics.get_meter("jetmesh.spendcaps", "0.1.0")
        self._alerts = meter.create_counter(
            ALERTS_METRIC, unit="{alert}",
            description="Spend alerts: a tenant's or user's spend reached the alert share "
                        "of a daily or monthly cap")

    def applies(self, tenant: str | None, user: str | None) -> bool:
        return bool(self.caps.counters(tenant, user, datetime.now(UTC)))

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await ensure_bucket(self.js, subjects.BUCKET_SPEND,
                                           replicas=self.replicas, max_age_s=62 * 86400)
        return self._kv

    async def counter(self, key: str) -> SpendCounter:
        kv = await self._bucket()
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return SpendCounter()
        return parse_counter(SpendCounter, key, entry.value)

    async def _update(self, key: str, change: Callable[[SpendCounter], object]
                      ) -> SpendCounter:
        kv = await self._bucket()
        async with self._locks.setdefault(key, asyncio.Lock()):
            return await self._cas(kv, key, change)

    async def _cas(self, kv: KeyValue, key: str, change: Callable[[SpendCounter], object]
                   ) -> SpendCounter:
        for attempt in range(self.attempts):
            cached = self._last.pop(key, None)
            revision: int | None
            if cached is not None:
                c, revision = cached[0].model_copy(deep=True), cached[1]
            else:
                try:
                    entry = await kv.get(key)
                    c = parse_counter(SpendCounter, key, entry.value)
                    revision = entry.revision
                except KeyNotFoundError:
                    c, revision = SpendCounter(), None
            try:
                change(c)
            except BudgetRefused:
                if cached is not None:
                    continue  # decided on our copy: decide again on the stored counter
                raise
            data = c.model_dump_json().encode()
            try:
                if revision is None:
                    new_rev = await kv.create(key, data)
                else:
                    new_rev = await kv.update(key, data, last=revision)
                self._last[key] = (c, int(new_rev))
                return c
            except KeyWrongLastSequenceError:
                if cached is not None:
                    continue  # our copy was stale: read it, no back-off
                # Another call changed it first: read again and re-decide, after a short
                # random back-off so that many contenders do not collide in lockstep.
                await asyncio.sleep(random.uniform(0, 0.002 * min(attempt + 1, 10)))
        raise RuntimeError(f"spend counter {key} too contended")

    async def reserve(self, tenant: str | None, user: str | None, usd: float
                      ) -> SpendReservation | None:
        """Reserve `usd` on every capped counter of this tenant and user, or raise
        BudgetRefused (nothing stays reserved). None: no cap applies."""
        counters = tuple(self.caps.counters(tenant, user, datetime.now(UTC)))
        if not counters:
            return None
        res = SpendReservation(uuid.uuid4().hex, usd, counters)
        taken: list[str] = []
        try:
            for key, scope, who, period, cap in counters:
                def change(c: SpendCounter, cap: float = cap, scope: str = scope,
                           period: str = period, who: str = who) -> None:
                    total = c.spent_usd + c.reserved_usd + usd
                    if total > cap + 1e-12:
                        raise BudgetRefused(f"usd ({scope} {who} {ADJECTIVE[period]} cap)",
                                            cap, total)
                    c.reserved[res.id] = usd

                await self._update(key, change)
                taken.append(key)
        except BaseException:
            for key in taken:
                await self._update(key, lambda c: c.reserved.pop(res.id, None))
            raise
        return res

    async def settle(self, res: SpendReservation, usd: float, *, task_id: str | None = None,
                     step_id: str | None = None) -> list[SpendAlert]:
        """Replace the reservation by what the call cost; the alerts this crossing gave."""
        alerts: list[SpendAlert] = []
        share = self.caps.alert_share
        for key, scope, who, period, cap in res.counters:
            crossed: list[bool] = []

            def change(c: SpendCounter, cap: float = cap,
                       crossed: list[bool] = crossed) -> None:
                crossed.clear()
                c.reserved.pop(res.id, None)
                c.spent_usd += usd
                if not c.alerted and c.spent_usd >= share * cap - 1e-12:
                    c.alerted = True
                    crossed.append(True)

            c = await self._update(key, change)
            if crossed:
                alerts.append(SpendAlert(scope=scope, who=who, period=period, key=key,
                                         cap_usd=cap, share=share, spent_usd=c.spent_usd,
                                         task_id=task_id, step_id=step_id))
                self._alerts.add(1, {"jetmesh.spend.scope": scope,
                                     f"jetmesh.{scope}": who if scope == "tenant"
                                     else who_token(who),
                                     "jetmesh.spend.period": period})
        return alerts

    async def release(self, res: SpendReservation) -> None:
        for key, *_ in res.counters:
            await self._update(key, lambda c: c.reserved.pop(res.id, None))


async def post_alert(url: str, alert: SpendAlert, *, attempts: int = 3,
                     timeout_s: float = 5.0) -> bool:
    """POST the alert as JSON to the webhook, retried with back-off; False if it was
    never accepted (logged; the BudgetAlerted event on the ledger stays the record)."""
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        for attempt in range(attempts):
            try:
                r = await client.post(url, content=alert.model_dump_json(),
                                      headers={hn.CONTENT_TYPE: "application/json"})
                if r.status_code < 300:
                    return True
                why = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                why = str(e) or type(e).__name__
            if attempt + 1 < attempts:
                await asyncio.sleep(0.2 * 2 ** attempt)
    log.error("spend alert webhook %s not accepted: %s", url, why)
    return False
