"""What the FSM storage knows in memory during one active term, pure: no I/O, no clock, no asyncio.

Three layers, read top-down (:meth:`FsmJournal.lookup`):

* **the running update's own writes** - buffered per update (by inbox ``seq``) until its handler
  returns. A handler killed or cancelled midway leaves nothing behind (:meth:`discard`): the next
  leader runs the update again against the state as it was.
* **finished updates' writes** - waiting for the group commit of their done marks, which writes
  them in the same transaction (:meth:`to_commit` / :meth:`committed`). Later updates of the same
  chat read them from here, so the commit window never shows them an older state.
* **committed records** - what the database holds, as read or written in this term (bounded,
  least recently used first out). While this instance is the fenced leader nobody else writes
  the table, so a record read once stays right until the term ends (:meth:`reset`).

A miss in all three means "ask the database". Versions order the writes of one key: the record
committed for a key is the newest of the flushed updates' writes, and a finished write that a
newer one replaced is never resurrected by an older commit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

#: Committed records kept in memory per term (least recently used are dropped beyond this).
CACHE_MAX = 10_000


@dataclass(frozen=True)
class FsmRecord:
    """One storage key's state and data, as stored: data is JSON text (a copy by construction)."""

    state: str | None = None
    data: str = "{}"
    state_expires_at: float | None = None  # unix seconds; None: no expiry
    data_expires_at: float | None = None


EMPTY = FsmRecord()


class FsmJournal:
    """The in-memory layers of :class:`utils.state.fsm.DurableStorage` for one term."""

    def __init__(self, cache_max: int = CACHE_MAX) -> None:
        self.cache_max = cache_max
        self._version = 0
        self._running: dict[int, dict[Hashable, FsmRecord]] = {}
        self._finished: dict[int, dict[Hashable, tuple[int, FsmRecord]]] = {}
        self._overlay: dict[Hashable, tuple[int, FsmRecord]] = {}
        self._cache: OrderedDict[Hashable, FsmRecord] = OrderedDict()

    # -- reading -----------------------------------------------------------------------------

    def lookup(self, key: Hashable, owner: int | None) -> FsmRecord | None:
        """The record this term knows for *key* as seen by update *owner*; None: read the database."""
        if owner is not None:
            own = self._running.get(owner)
            if own is not None and key in own:
                return own[key]
        pending = self._overlay.get(key)
        if pending is not None:
            return pending[1]
        record = self._cache.get(key)
        if record is not None:
            self._cache.move_to_end(key)
        return record

    @property
    def pending(self) -> int:
        """Keys written by finished updates and not committed yet."""
        return len(self._overlay)

    def is_open(self, owner: int) -> bool:
        return owner in self._running

    # -- an update's life ----------------------------------------------------------------------

    def open(self, owner: int) -> None:
        """Update *owner* starts: its writes are buffered from now on."""
        self._running[owner] = {}

    def write(self, owner: int, key: Hashable, record: FsmRecord) -> None:
        """Buffer a write of the running update *owner* (see :meth:`is_open`)."""
        self._running[owner][key] = record

    def finish(self, owner: int) -> bool:
        """*owner*'s handler returned: its writes wait for its done mark. True if it wrote any."""
        writes = self._running.pop(owner, None)
        if not writes:
            return False
        versioned: dict[Hashable, tuple[int, FsmRecord]] = {}
        for key, record in writes.items():
            self._version += 1
            versioned[key] = self._overlay[key] = (self._version, record)
        self._finished[owner] = versioned
        return True

    def discard(self, owner: int) -> None:
        """*owner* did not finish (killed, cancelled, lease lost): forget its writes."""
        self._running.pop(owner, None)

    # -- the group commit ----------------------------------------------------------------------

    def to_commit(self, owners: Iterable[int]) -> list[tuple[Hashable, FsmRecord]]:
        """The records to write with the done marks of *owners*: per key, the newest write."""
        newest = _newest(self._finished.get(owner, {}) for owner in owners)
        return [(key, record) for key, (_, record) in newest.items()]

    def committed(self, owners: Iterable[int]) -> None:
        """The done marks of *owners* (and their writes) are durable.

        An older write of the same key by an update whose done mark is still to come is dropped:
        it is superseded, and committing it later would put the older value back (an update
        marked done at once, such as a suspect that ran alone, can overtake the group commit)."""
        newest = _newest([self._finished.pop(owner, {}) for owner in owners])
        for key, (version, record) in newest.items():
            for writes in self._finished.values():
                older = writes.get(key)
                if older is not None and older[0] < version:
                    del writes[key]
            if self._overlay.get(key, (None,))[0] == version:
                del self._overlay[key]
            self.remember(key, record)

    def written_directly(self, key: Hashable, record: FsmRecord) -> None:
        """A write outside any update was committed at once: it replaces every finished write of
        *key* not committed yet (the caller holds the commit lock, so none is being written)."""
        for writes in self._finished.values():
            writes.pop(key, None)
        self._overlay.pop(key, None)
        self.remember(key, record)

    def remember(self, key: Hashable, record: FsmRecord) -> None:
        """*record* is what the database holds for *key*."""
        self._cache[key] = record
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_max:
            self._cache.popitem(last=False)

    def reset(self) -> None:
        """A term begins or ends: nothing known in memory may be trusted across it."""
        self._running.clear()
        self._finished.clear()
        self._overlay.clear()
        self._cache.clear()


def _newest(writes: Iterable[dict[Hashable, tuple[int, FsmRecord]]]) -> dict[Hashable, tuple[int, FsmRecord]]:
    """Per key, the entry with the highest version among *writes* (pure)."""
    newest: dict[Hashable, tuple[int, FsmRecord]] = {}
    for entries in writes:
        for key, entry in entries.items():
            if key not in newest or entry[0] > newest[key][0]:
                newest[key] = entry
    return newest
