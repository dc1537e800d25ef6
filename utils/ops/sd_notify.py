"""systemd's notify protocol, spoken directly (the ``sdnotify`` package swallows errors).

``READY=1`` once running (passive counts as started), ``STATUS=`` on each mode change,
``WATCHDOG=1`` from the event loop at half of ``WATCHDOG_USEC`` (so a blocked loop misses its
pings and systemd restarts the service), ``STOPPING=1`` on shutdown. Without ``NOTIFY_SOCKET``
every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger("solobot.systemd")


class SystemdNotifier:
    def __init__(self, address: str | None, watchdog_usec: int | None) -> None:
        self.address = address
        self.watchdog_interval = watchdog_usec / 2_000_000 if watchdog_usec else None
        self._sock: socket.socket | None = None
        self._watchdog: asyncio.Task[None] | None = None

    @classmethod
    def from_environment(cls) -> SystemdNotifier:
        address = os.environ.get("NOTIFY_SOCKET") or None
        usec = os.environ.get("WATCHDOG_USEC", "")
        watchdog_pid = os.environ.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process meant to ping; another one (a child) must not.
        if watchdog_pid and watchdog_pid != str(os.getpid()):
            usec = ""
        return cls(address, int(usec) if usec.isdigit() and int(usec) > 0 else None)

    def notify(self, message: str) -> bool:
        if self.address is None:
            return False
        if self._sock is None:  # on first use, not in the constructor
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # A leading "@" names an abstract socket (a leading NUL byte on the wire).
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            self._sock.sendto(message.encode(), target)
            return True
        except OSError as exc:
            log.warning("sd_notify %r failed: %s", message.split("=")[0], exc)
            return False

    def close(self) -> None:
        """Close the socket (a later notify opens a new one)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def start_watchdog(self) -> None:
        if self.watchdog_interval and self.address and self._watchdog is None:
            self._watchdog = asyncio.create_task(self._ping(), name="solobot-watchdog")

    async def _ping(self) -> None:
        assert self.watchdog_interval is not None
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)

    async def stop_watchdog(self) -> None:
        task, self._watchdog = self._watchdog, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
