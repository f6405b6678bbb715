"""Stream declarations are idempotent; drift is updated or reported, never ignored."""

from __future__ import annotations

import pytest
from nats.js.api import RetentionPolicy

from jetmesh.bus import subjects
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.errors import StreamConfigConflict
from jetmesh.bus.server import EmbeddedNats
from jetmesh.bus.settings import BusSettings
from jetmesh.bus.streams import declare_streams, stream_configs


async def test_declare_is_idempotent_and_updates_or_reports_drift(fresh_server: EmbeddedNats
                                                                  ) -> None:
    nc = await connect(fresh_server.url)
    js = jetstream(nc)
    try:
        first = await declare_streams(js)
        assert sorted(first.created) == sorted(c.name for c in stream_configs())
        second = await declare_streams(js)
        assert second.created == [] and second.updated == []
        # An operator changed a setting we manage: it is put back and reported.
        cfg = (await js.stream_info(subjects.STREAM_LEDGER)).config
        cfg.duplicate_window = 5.0
        await js.update_stream(cfg)
        third = await declare_streams(js)
        assert third.updated == [subjects.STREAM_LEDGER]
        info = await js.stream_info(subjects.STREAM_LEDGER)
        assert info.config.duplicate_window == BusSettings().duplicate_window_s
        # A change the server cannot apply (retention of an existing stream) is an error.
        cfg = (await js.stream_info(subjects.STREAM_WORK)).config
        await js.delete_stream(subjects.STREAM_WORK)
        cfg.retention = RetentionPolicy.LIMITS
        await js.add_stream(cfg)
        with pytest.raises(StreamConfigConflict) as info_err:
            await declare_streams(js)
        assert info_err.value.name == subjects.STREAM_WORK
        assert "retention" in str(info_err.value)
    finally:
        await nc.close()
