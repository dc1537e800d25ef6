"""A fake Telegram Bot API server, faithful to the semantics solobot depends on.

* One poller per token: a getUpdates that arrives while another is pending ends the *older* one
  with ``409 Conflict: terminated by other getUpdates request`` -- at most once every 3 s per
  token, as the real server does (a newer request waits out the rest of that window).
* A poller whose client disconnected (process killed, request cancelled) is gone, not a conflict.
* 409 "can't use getUpdates method while webhook is active" while a webhook is set.
* ``offset`` confirms every update below it; updates are returned oldest first, ``limit`` at most.
* 429 with ``parameters.retry_after`` on demand (``flood``), and a send delay (slow handlers).
* Every getUpdates and every sent message is recorded, with the *tag* of the caller: instances
  are pointed at ``http://host:port/<tag>`` so the log says which process did what.

Run it by hand:  ``python -m tests.fake_bot_api serve --port 8081``
and talk to it:  ``python -m tests.fake_bot_api send --port 8081 --text /ping``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

CONFLICT_WINDOW = 3.0
CONFLICT_TEXT = (
    "Conflict: terminated by other getUpdates request; "
    "make sure that only one bot instance is running"
)
WEBHOOK_TEXT = (
    "Conflict: can't use getUpdates method while webhook is active; "
    "use deleteWebhook to delete the webhook first"
)

Params = dict[str, Any]
Req = web.Request
Resp = web.Response


@dataclass
class Poll:
    tag: str
    started: float
    offset: int | None
    timeout: float
    ended: float | None = None
    outcome: str = "pending"  # ok | conflict | webhook | flood | gone
    count: int = 0


@dataclass
class Sent:
    tag: str
    method: str
    chat_id: str
    text: str | None
    reply_to: int | None
    message_id: int
    at: float


@dataclass
class _Waiter:
    poll: Poll
    request: web.Request
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    conflict: bool = False


@dataclass
class BotState:
    bot_id: int
    updates: list[dict[str, Any]] = field(default_factory=list)
    next_update_id: int = 1000
    next_message_id: int = 1
    poller: _Waiter | None = None
    last_conflict: float = 0.0
    webhook: str = ""
    new_update: asyncio.Event = field(default_factory=asyncio.Event)


class FakeBotAPI:
    """The server; run it in a background thread with :meth:`start_in_thread` (tests)."""

    def __init__(self) -> None:
        self.bots: dict[int, BotState] = {}
        self.polls: list[Poll] = []
        self.sent: list[Sent] = []
        self.calls: list[tuple[str, str, float]] = []  # (tag, method, at)
        self.flood: dict[str, list[int]] = {}  # method -> [remaining, retry_after]
        self.flood_chat: dict[str, str] = {}  # method -> only requests to this chat_id
        self.send_delay = 0.0
        self.revoked: set[str] = set()  # tokens answered with 401
        self.sending_now = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- app ---------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", r"/{tag:[^/]*}/bot{token}/{method}", self._api)
        app.router.add_route("*", r"/bot{token}/{method}", self._api)
        app.router.add_post("/_fake/message", self._control_message)
        app.router.add_get("/_fake/sent", self._control_sent)
        app.router.add_get("/_fake/polls", self._control_polls)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        # handler_cancellation: a client that goes away cancels its pending getUpdates.
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        self._loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def start_in_thread(self) -> FakeBotAPI:
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.start())
            started.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-bot-api", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("fake Bot API did not start")
        return self

    def stop_thread(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def url(self, tag: str = "") -> str:
        base = f"http://127.0.0.1:{self.port}"
        return f"{base}/{tag}" if tag else base

    # -- test controls (thread-safe) ---------------------------------------------------------

    def _call(self, fn: Any, *args: Any) -> Any:
        assert self._loop is not None

        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def send_user_message(self, bot_id: int, text: str, *, user_id: int = 111, chat_id: int | None = None,
                          photo: bool = False) -> int:
        """Queue a message update as if *user_id* wrote it; return the update's message_id."""
        return int(self._call(self._add_message, bot_id, text, user_id, chat_id or user_id, photo))

    def set_webhook(self, bot_id: int, url: str) -> None:
        self._call(lambda: setattr(self._bot(bot_id), "webhook", url))

    def webhook(self, bot_id: int) -> str:
        return str(self._call(lambda: self._bot(bot_id).webhook))

    def set_flood(self, method: str, count: int, retry_after: int, chat_id: str | None = None) -> None:
        """The next *count* calls of *method* (to *chat_id*, if given) get 429 retry_after."""

        def arm() -> None:
            self.flood[method] = [count, retry_after]
            if chat_id is not None:
                self.flood_chat[method] = chat_id

        self._call(arm)

    def pending_updates(self, bot_id: int) -> int:
        return int(self._call(lambda: len(self._bot(bot_id).updates)))

    def snapshot_polls(self) -> list[Poll]:
        with self._lock:
            return [Poll(**vars(p)) for p in self.polls]

    def snapshot_sent(self) -> list[Sent]:
        with self._lock:
            return list(self.sent)

    def conflicts(self) -> int:
        return sum(1 for p in self.snapshot_polls() if p.outcome == "conflict")

    def replies_to(self, message_id: int) -> list[Sent]:
        return [s for s in self.snapshot_sent() if s.reply_to == message_id]

    # -- state -------------------------------------------------------------------------------

    def _bot(self, bot_id: int) -> BotState:
        if bot_id not in self.bots:
            self.bots[bot_id] = BotState(bot_id)
        return self.bots[bot_id]

    def _add_message(self, bot_id: int, text: str, user_id: int, chat_id: int, photo: bool) -> int:
        state = self._bot(bot_id)
        state.next_update_id += 1
        state.next_message_id += 1
        message: dict[str, Any] = {
            "message_id": state.next_message_id,
            "date": int(time.time()),
            "chat": {"id": chat_id, "type": "private", "first_name": "User"},
            "from": {"id": user_id, "is_bot": False, "first_name": "User"},
        }
        if photo:
            message["photo"] = [{"file_id": f"photo-{state.next_message_id}", "file_unique_id": "u",
                                 "width": 10, "height": 10}]
            if text:
                message["caption"] = text
        else:
            message["text"] = text
            if text.startswith("/"):
                command = text.split()[0]
                message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(command)}]
        state.updates.append({"update_id": state.next_update_id, "message": message})
        state.new_update.set()
        return int(state.next_message_id)

    # -- the API -----------------------------------------------------------------------------

    @staticmethod
    def _ok(result: Any) -> web.Response:
        return web.json_response({"ok": True, "result": result})

    @staticmethod
    def _error(code: int, description: str, **parameters: Any) -> web.Response:
        body: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
        if parameters:
            body["parameters"] = parameters
        return web.json_response(body, status=code)

    async def _params(self, request: web.Request) -> dict[str, Any]:
        params: dict[str, Any] = dict(request.query)
        if request.can_read_body:
            if request.content_type == "application/json":
                params.update(await request.json())
            else:
                for key, value in (await request.post()).items():
                    params[key] = value if isinstance(value, str) else getattr(value, "filename", "")
        return params

    async def _api(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        method = request.match_info["method"]
        tag = request.match_info.get("tag", "")
        bot_id_text, _, secret = token.partition(":")
        with self._lock:
            self.calls.append((tag, method, time.time()))
        if not bot_id_text.isdigit() or len(secret) < 30 or token in self.revoked:
            return self._error(401, "Unauthorized")
        state = self._bot(int(bot_id_text))
        params = await self._params(request)
        flood = self.flood.get(method)
        wanted_chat = self.flood_chat.get(method)
        if wanted_chat is not None and str(params.get("chat_id")) != wanted_chat:
            flood = None
        if flood and flood[0] > 0:
            flood[0] -= 1
            if method == "getUpdates":
                with self._lock:
                    self.polls.append(Poll(tag, time.time(), None, 0, time.time(), "flood"))
            return self._error(429, f"Too Many Requests: retry after {flood[1]}", retry_after=flood[1])
        handler = getattr(self, f"_m_{method}", None)
        if handler is None:
            return self._error(404, "Not Found: method not found")
        result: web.Response = await handler(state, params, request, tag)
        return result

    async def _m_getMe(self, state: BotState, params: Params, request: Req, tag: str) -> Resp:
        return self._ok({"id": state.bot_id, "is_bot": True, "first_name": "Fake",
                         "username": f"fake_{state.bot_id}_bot"})

    async def _m_deleteWebhook(self, state: BotState, params: Params, request: Req, tag: str) -> Resp:
        state.webhook = ""
        return self._ok(True)

    async def _m_setWebhook(self, state: BotState, params: Params, request: Req, tag: str) -> Resp:
        state.webhook = str(params.get("url", ""))
        return self._ok(True)

    async def _m_getWebhookInfo(self, state: BotState, params: Params, request: Req, tag: str) -> Resp:
        return self._ok({"url": state.webhook, "has_custom_certificate": False,
                         "pending_update_count": len(state.updates)})

    async def _m_setMyCommands(self, state: BotState, params: Params, request: Req, tag: str) -> Resp:
        return self._ok(True)

    async def _m_getUpdates(self, state: BotState, params: Params, request: Req, tag: str) -> Resp:
        offset = int(params["offset"]) if params.get("offset") not in (None, "") else None
        limit = max(1, min(100, int(params.get("limit") or 100)))
        timeout = float(params.get("timeout") or 0)
        poll = Poll(tag, time.time(), offset, timeout)
        with self._lock:
            self.polls.append(poll)
        if state.webhook:
            return self._finish(poll, "webhook", self._error(409, WEBHOOK_TEXT))
        me = _Waiter(poll, request)
        # One poller per token: end the older one (at most once per CONFLICT_WINDOW).
        while state.poller is not None and state.poller is not me:
            old = state.poller
            transport = old.request.transport
            if transport is None or transport.is_closing():
                old.poll.outcome = "gone"
                state.poller = None
                break
            wait = state.last_conflict + CONFLICT_WINDOW - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            state.last_conflict = time.time()
            old.conflict = True
            old.wake.set()
            state.poller = None
        state.poller = me
        try:
            if offset is not None:
                if offset < 0:
                    state.updates = state.updates[offset:]
                else:
                    state.updates = [u for u in state.updates if u["update_id"] >= offset]
            deadline = time.monotonic() + timeout
            while not state.updates and not me.conflict:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                state.new_update.clear()
                waits = [asyncio.ensure_future(state.new_update.wait()),
                         asyncio.ensure_future(me.wake.wait())]
                try:
                    await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
            if me.conflict:
                return self._finish(poll, "conflict", self._error(409, CONFLICT_TEXT))
            batch = state.updates[:limit]
            poll.count = len(batch)
            return self._finish(poll, "ok", self._ok(batch))
        except asyncio.CancelledError:
            poll.outcome = "gone"
            poll.ended = time.time()
            raise
        finally:
            if state.poller is me:
                state.poller = None

    def _finish(self, poll: Poll, outcome: str, response: web.Response) -> web.Response:
        poll.outcome = outcome
        poll.ended = time.time()
        return response

    async def _send(self, state: BotState, params: dict[str, Any], tag: str, method: str,
                    extra: dict[str, Any]) -> web.Response:
        chat_id = str(params.get("chat_id", ""))
        if not chat_id:
            return self._error(400, "Bad Request: chat_id is empty")
        if chat_id.startswith("@") and "missing" in chat_id:
            return self._error(400, "Bad Request: chat not found")
        reply_to = None
        if params.get("reply_parameters"):
            rp = params["reply_parameters"]
            rp = json.loads(rp) if isinstance(rp, str) else rp
            reply_to = int(rp.get("message_id"))
        elif params.get("reply_to_message_id"):
            reply_to = int(params["reply_to_message_id"])
        self.sending_now += 1
        try:
            if self.send_delay:
                await asyncio.sleep(self.send_delay)
        finally:
            self.sending_now -= 1
        state.next_message_id += 1
        text = params.get("text", params.get("caption"))
        with self._lock:
            self.sent.append(Sent(tag, method, chat_id, text, reply_to, state.next_message_id, time.time()))
        numeric = int(chat_id) if chat_id.lstrip("-").isdigit() else -1001
        chat: dict[str, Any] = {"id": numeric, "type": "private"}
        if chat_id.startswith("@"):
            chat = {"id": -1001234567890, "type": "channel", "username": chat_id[1:], "title": chat_id}
        message = {"message_id": state.next_message_id, "date": int(time.time()), "chat": chat, **extra}
        if text is not None:
            message["text" if method == "sendMessage" else "caption"] = text
        return self._ok(message)

    async def _m_sendMessage(self, state: BotState, params: Params, request: Req, tag: str) -> Resp:
        return await self._send(state, params, tag, "sendMessage", {})

    async def _m_sendPhoto(self, state: BotState, params: Params, request: Req, tag: str) -> Resp:
        photo = [{"file_id": str(params.get("photo")), "file_unique_id": "u", "width": 10, "height": 10}]
        return await self._send(state, params, tag, "sendPhoto", {"photo": photo})

    # -- HTTP controls (for the manual demo) -------------------------------------------------

    async def _control_message(self, request: web.Request) -> web.Response:
        body = await request.json()
        user_id = int(body.get("user_id", 111))
        message_id = self._add_message(int(body["bot_id"]), str(body["text"]), user_id,
                                       int(body.get("chat_id", user_id)), False)
        return web.json_response({"message_id": message_id})

    async def _control_sent(self, _request: web.Request) -> web.Response:
        return web.json_response([vars(s) for s in self.snapshot_sent()])

    async def _control_polls(self, _request: web.Request) -> web.Response:
        return web.json_response([vars(p) for p in self.snapshot_polls()])


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fake_bot_api", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the fake server")
    serve.add_argument("--port", type=int, default=8081)
    send = sub.add_parser("send", help="make a user write to the bot")
    send.add_argument("--port", type=int, default=8081)
    send.add_argument("--bot-id", type=int, default=123456)
    send.add_argument("--user-id", type=int, default=111)
    send.add_argument("--text", required=True)
    sub.add_parser("sent", help="print what the bot sent").add_argument("--port", type=int, default=8081)
    args = parser.parse_args(argv)
    if args.command == "serve":
        fake = FakeBotAPI()

        async def run() -> None:
            await fake.start(port=args.port)
            print(f"fake Bot API on http://127.0.0.1:{fake.port} (TELEGRAM_API_URL)", flush=True)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()

        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run())
        return 0
    base = f"http://127.0.0.1:{args.port}/_fake/"
    if args.command == "send":
        body = json.dumps({"bot_id": args.bot_id, "text": args.text, "user_id": args.user_id}).encode()
        request = urllib.request.Request(base + "message", body, {"Content-Type": "application/json"})
        print(urllib.request.urlopen(request, timeout=5).read().decode())
        return 0
    for item in json.loads(urllib.request.urlopen(base + "sent", timeout=5).read()):
        print(f"[{item['tag'] or '-'}] to {item['chat_id']}: {item['text']!r} (reply to {item['reply_to']})")
    return 0


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
