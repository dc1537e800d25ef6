"""An aiogram conversation bot with a scheduled job, run by solobot without editing solobot:

    BOT_MODULE=examples.conversation_bot python main.py

``/form`` asks "name?", then "age?", then answers "done NAME AGE". The conversation's state
lives in solobot's state store (SQLite, or PostgreSQL with ``DATABASE_URL``), written together
with each update's done mark: stop or kill the active instance between two answers and the
standby carries on where the user is. Nothing here is solobot-specific except the optional
``roles``: plain aiogram handlers, ``StatesGroup`` and ``FSMContext``.

The scheduled job (``roles``) runs only on the active instance: every ``REMINDER_SECONDS``
(default 3600) it sends ``REMINDER_TEXT`` to ``REMINDER_CHAT_ID``, if that is set.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from aiogram import Bot, F, Router
from aiogram.filters import Command
from aiogram.fsm.context import FSMContext
from aiogram.fsm.state import State, StatesGroup
from aiogram.types import Message
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from utils.ops.bot_module import BotContext

log = logging.getLogger("conversation_bot")

router = Router(name="conversation")


class Form(StatesGroup):
    name = State()
    age = State()


@router.message(Command("form"))
async def form_start(message: Message, state: FSMContext) -> None:
    await state.set_state(Form.name)
    await message.answer("name?")


@router.message(Command("cancel"))
async def form_cancel(message: Message, state: FSMContext) -> None:
    await state.clear()
    await message.answer("cancelled")


@router.message(Form.name, F.text)
async def form_name(message: Message, state: FSMContext) -> None:
    await state.update_data(name=message.text)
    await state.set_state(Form.age)
    await message.answer("age?")


@router.message(Form.age, F.text)
async def form_age(message: Message, state: FSMContext) -> None:
    if not (message.text or "").isdigit():
        await message.answer("age? (a number)")
        return
    data = await state.get_data()
    await state.clear()
    await message.answer(f"done {data['name']} {message.text}")


@router.message()
async def fallback(message: Message) -> None:
    await message.answer("send /form to start")


class Reminder:
    """An active-only role: an APScheduler job built at each activation, shut down before release
    (APScheduler cannot share a job store between processes; only the leader may send)."""

    name = "reminder"

    def __init__(self, bot: Bot, chat_id: str, every: float, text: str) -> None:
        self.bot = bot
        self.chat_id = chat_id
        self.every = every
        self.text = text
        self._scheduler: Any = None

    async def start(self, lease: Any) -> None:
        self._scheduler = AsyncIOScheduler()
        self._scheduler.add_job(self._remind, "interval", seconds=self.every, id="reminder")
        self._scheduler.start()
        log.info("reminder: every %.0f s to chat %s", self.every, self.chat_id)

    async def stop(self, *, voluntary: bool) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None

    async def _remind(self) -> None:
        await self.bot.send_message(self.chat_id, self.text)


def roles(ctx: BotContext) -> list[Reminder]:
    """The active-only jobs: solobot starts them when this instance becomes active."""
    chat = os.environ.get("REMINDER_CHAT_ID")
    if not chat:
        return []
    every = float(os.environ.get("REMINDER_SECONDS", "3600"))
    return [Reminder(ctx.bot, chat, every, os.environ.get("REMINDER_TEXT", "/form is open: tell me about you"))]
