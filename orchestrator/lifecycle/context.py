"""What the lifecycle functions need, built once per process from :class:`Settings`."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.deepbrain import DeepBrainClient


@dataclass
class Lifecycle:
    settings: Settings
    db: Database
    vendor: DeepBrainClient

    @classmethod
    def from_settings(cls, settings: Settings) -> Lifecycle:
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
        )

    def close(self) -> None:
        self.vendor.close()
        self.db.dispose()
