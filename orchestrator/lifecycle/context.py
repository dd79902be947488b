"""What the lifecycle functions need, built once per process from :class:`Settings`."""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.deepbrain import DeepBrainClient
from orchestrator.lifecycle.dispatch import Dispatcher, InlineDispatcher


@dataclass
class Lifecycle:
    settings: Settings
    db: Database
    vendor: DeepBrainClient
    dispatcher: Dispatcher = field(default_factory=InlineDispatcher)

    def __post_init__(self) -> None:
        if isinstance(self.dispatcher, InlineDispatcher):
            self.dispatcher.lifecycle = self
        self.db.on_commit("slot_freed", self._slot_freed)
        self.db.on_commit("events_pending", self.dispatcher.publish_events)

    def _slot_freed(self) -> None:
        from orchestrator.lifecycle import store

        if store.has_waiting(self.db):
            self.dispatcher.admit_waiting()

    @classmethod
    def from_settings(cls, settings: Settings, dispatcher: Dispatcher | None = None) -> Lifecycle:
        app_id, user_key = settings.vendor_credentials()
        return cls(
            settings=settings,
            db=Database(settings.effective_database_url, pool_size=settings.db_pool_size),
            vendor=DeepBrainClient(
                settings.deepbrain_base_url,
                app_id,
                user_key,
                timeout_seconds=settings.vendor_timeout_seconds,
            ),
            dispatcher=dispatcher or InlineDispatcher(),
        )

    def close(self) -> None:
        self.vendor.close()
        self.db.dispose()
