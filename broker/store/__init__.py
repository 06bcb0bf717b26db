"""Message store backends behind one interface (see base.MessageStore)."""

from broker.store.base import (
    Appended,
    MessageStore,
    NewMessage,
    Rejected,
    StoredMessage,
    StoreError,
    StoreFull,
    StoreStats,
    stored_message,
)
from broker.store.sqlite import SqliteMessageStore

__all__ = [
    "Appended",
    "MessageStore",
    "NewMessage",
    "Rejected",
    "SqliteMessageStore",
    "StoreError",
    "StoreFull",
    "StoreStats",
    "StoredMessage",
    "stored_message",
]
