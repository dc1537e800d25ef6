"""The bot itself: command handlers and the autoposter's admin commands.

Handlers get what they need from the dispatcher's workflow data (set in ``utils/ops/daemon_parts.py``):
``admin_ids``, ``status`` (the typed snapshot /health serves) and ``autoposter`` (or None).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Awaitable, Callable

from aiogram import F, Router
from aiogram.filters import Command, CommandObject, CommandStart
from aiogram.types import Message

from utils.autoposter.role import Autoposter, PostRejected
from utils.ops.status_snapshot import AUTOPOSTER_OFF, Delivery, PollingFacts, StatusSnapshot, UpdateCounts
from utils.updates.stats import UpdateStats

log = logging.getLogger("solobot.bot")

router = Router(name="solobot")

#: The daemon's status snapshot (``utils.ops.status_report.StatusReporter.snapshot``).
StatusSource = Callable[[], Awaitable[StatusSnapshot]]

HELP = (
    "I am a channel autoposter.\n"
    "/ping - check that I am alive\n"
    "/help - this text\n"
    "Admins: /status, /post <text> (or just send text or a photo), /queue, /cancel <id>, "
    "/postnow <id>, /retry <id>, /pause, /resume, /schedule"
)


def is_admin(message: Message, admin_ids: frozenset[int]) -> bool:
    return message.from_user is not None and message.from_user.id in admin_ids


@router.message(CommandStart())
async def cmd_start(message: Message) -> None:
    await message.answer("Hello! " + HELP)


@router.message(Command("help"))
async def cmd_help(message: Message) -> None:
    await message.answer(HELP)


@router.message(Command("ping"))
async def cmd_ping(message: Message) -> None:
    await message.reply("pong")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return str(dt.timedelta(seconds=int(seconds)))


def delivery_line(delivery: Delivery, updates: UpdateCounts) -> str:
    """How updates arrive: getUpdates in polling mode; the receiver (and, on the leader,
    Telegram's view from getWebhookInfo) in webhook mode."""
    if isinstance(delivery, PollingFacts):
        last_ok = "never" if delivery.seconds_since_ok is None else f"{delivery.seconds_since_ok:.0f} s ago"
        return f"polling: last ok {last_ok}, conflicts {updates[UpdateStats.conflicts]}"
    received = dataclasses.asdict(delivery.received)  # the receiver's counters, as it declares them
    line = "webhook: " + ", ".join(f"{count} {outcome}" for outcome, count in received.items()
                                   if isinstance(count, int))
    if delivery.received.inbox_error:
        line += f"; inbox not writable: {delivery.received.inbox_error}"
    if delivery.info is not None:
        line += f"\nTelegram: {delivery.info.get('pending_update_count', '?')} pending"
        if delivery.info.get("last_error_message"):
            line += f", last error: {delivery.info['last_error_message']}"
    return line


def describe_status(s: StatusSnapshot) -> str:
    """The /status answer: who this is, who holds the lock, how updates arrive, the autoposter."""
    term, holder = s.term, s.lock.holder
    held = (f"held by instance {holder.instance_id} (pid {holder.pid} on {holder.host})" if holder is not None
            else "no holder known")
    return "\n".join([
        f"mode: {term.mode.value} (epoch {term.epoch})",
        f"instance: {term.instance_id} pid {term.pid} on {term.host}",
        f"uptime: {_age(term.uptime_s)}",
        f"lock: {s.lock.backend}, {held}",
        delivery_line(s.delivery, s.updates),
        f"autoposter: {s.autoposter.describe() if s.autoposter else AUTOPOSTER_OFF}",
    ])


@router.message(Command("status"))
async def cmd_status(message: Message, admin_ids: frozenset[int], status: StatusSource) -> None:
    if not is_admin(message, admin_ids):
        await message.answer("Sorry, /status is for admins only.")
        return
    await message.answer(describe_status(await status()))


# -- autoposter admin commands --------------------------------------------------------------

REFUSAL = "Sorry, only the bot's admins can manage posts."
#: At most this many users are remembered per day; once full, newcomers are not answered at all,
#: so a flood of fresh accounts can neither grow the memory nor make the bot reply in kind.
MAX_REFUSED_PER_DAY = 10_000


def utc_today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


class OncePerDay:
    """Who has had a notice today (UTC): one per user per day, memory dropped when the day turns.

    In memory only, per process: after a handover the new active instance does not know who was
    told, so a user may get the notice once more that day. Not worth a table.
    """

    def __init__(
        self, capacity: int = MAX_REFUSED_PER_DAY, today: Callable[[], dt.date] = utc_today
    ) -> None:
        self.capacity = capacity
        self.today = today
        self._day: dt.date | None = None
        self._told: set[int] = set()

    def first_today(self, user_id: int) -> bool:
        """True if *user_id* has not had the notice today (and records that it now has)."""
        today = self.today()
        if today != self._day:
            self._day, self._told = today, set()
        if user_id in self._told or len(self._told) >= self.capacity:
            return False
        self._told.add(user_id)
        return True


#: Non-admins who sent plain text or a photo and were told today.
refused_today = OncePerDay()


async def _admin_poster(
    message: Message, admin_ids: frozenset[int], autoposter: Autoposter | None,
    *, asked: bool = True,
) -> Autoposter | None:
    """The autoposter if *message* comes from an admin and it is on; otherwise answer why not.

    A non-admin's explicit command (*asked*) is always answered: they asked for something and an
    unanswered command looks broken. Plain text and photos (*asked* False) are refused at most
    once a day per user: in a group, or from a chatty user, every message would get the same
    reply otherwise.
    """
    if not is_admin(message, admin_ids):
        sender = message.from_user.id if message.from_user is not None else message.chat.id
        if asked or refused_today.first_today(sender):
            await message.answer(REFUSAL)
        return None
    if autoposter is None:
        await message.answer("The autoposter is off: set CHANNEL_ID and POST_CRON or POST_INTERVAL.")
        return None
    return autoposter


async def _queue_and_answer(
    message: Message, poster: Autoposter, *, text: str | None, photo: str | None
) -> None:
    try:
        post, when = await poster.enqueue(
            text=text, photo=photo, created_by=message.from_user.id if message.from_user else 0
        )
    except PostRejected as exc:
        await message.answer(f"Not queued: {exc}")
        return
    await message.answer(f"Queued post #{post.id}; it goes out {poster.describe_when(when)}.")


@router.message(Command("post"))
async def cmd_post(
    message: Message, command: CommandObject, admin_ids: frozenset[int],
    autoposter: Autoposter | None,
) -> None:
    poster = await _admin_poster(message, admin_ids, autoposter)
    if poster is None:
        return
    if not command.args:
        await message.answer("Usage: /post <text>")
        return
    await _queue_and_answer(message, poster, text=command.args, photo=None)


@router.message(Command("queue"))
async def cmd_queue(message: Message, admin_ids: frozenset[int], autoposter: Autoposter | None) -> None:
    poster = await _admin_poster(message, admin_ids, autoposter)
    if poster is not None:
        await message.answer(await poster.describe_queue())


def _post_id(command: CommandObject) -> int | None:
    arg = (command.args or "").strip().lstrip("#")
    return int(arg) if arg.isdigit() else None


@router.message(Command("cancel", "postnow", "retry"))
async def cmd_post_action(
    message: Message, command: CommandObject, admin_ids: frozenset[int],
    autoposter: Autoposter | None,
) -> None:
    poster = await _admin_poster(message, admin_ids, autoposter)
    if poster is None:
        return
    post_id = _post_id(command)
    if post_id is None:
        await message.answer(f"Usage: /{command.command} <post id>")
        return
    action = {"cancel": poster.cancel, "postnow": poster.post_now, "retry": poster.retry}
    await message.answer(await action[command.command](post_id))


@router.message(Command("pause", "resume"))
async def cmd_pause(
    message: Message, command: CommandObject, admin_ids: frozenset[int],
    autoposter: Autoposter | None,
) -> None:
    poster = await _admin_poster(message, admin_ids, autoposter)
    if poster is not None:
        await message.answer(await poster.set_paused(command.command == "pause"))


@router.message(Command("schedule"))
async def cmd_schedule(
    message: Message, admin_ids: frozenset[int], autoposter: Autoposter | None
) -> None:
    poster = await _admin_poster(message, admin_ids, autoposter)
    if poster is not None:
        await message.answer(await poster.describe_schedule())


@router.message(F.photo)
async def any_photo(message: Message, admin_ids: frozenset[int], autoposter: Autoposter | None) -> None:
    poster = await _admin_poster(message, admin_ids, autoposter, asked=False)
    if poster is not None and message.photo:
        await _queue_and_answer(
            message, poster, text=message.caption, photo=message.photo[-1].file_id
        )


@router.message(F.text & ~F.text.startswith("/"))
async def any_text(message: Message, admin_ids: frozenset[int], autoposter: Autoposter | None) -> None:
    poster = await _admin_poster(message, admin_ids, autoposter, asked=False)
    if poster is not None:
        await _queue_and_answer(message, poster, text=message.text, photo=None)


@router.message(F.text.startswith("/"))
async def unknown_command(message: Message) -> None:
    await message.answer("Unknown command. /help lists what I understand.")
