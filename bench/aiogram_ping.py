"""The baseline: plain aiogram ``Dispatcher.start_polling`` with bot.py's /ping handler.

No lock, no state, no durable anything: what a new user writes from aiogram's README. Reads
``BOT_TOKEN``, ``TELEGRAM_API_URL`` and ``POLLING_TIMEOUT`` like solobot; SIGTERM stops it. With
``BOT_MODULE`` (e.g. ``bench.conversation_bot``) it runs that module's ``router`` instead, FSM
state in aiogram's default ``MemoryStorage``.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
from pathlib import Path

from aiogram import Bot, Dispatcher, Router
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.filters import Command
from aiogram.types import Message

router = Router(name="ping")
#: Where BOT_MODULE is imported from (the script's own directory is bench/).
REPOSITORY = str(Path(__file__).resolve().parent.parent)


@router.message(Command("ping"))
async def cmd_ping(message: Message) -> None:
    await message.reply("pong")  # as bot.py's /ping


async def main() -> None:
    session = AiohttpSession(api=TelegramAPIServer.from_base(os.environ["TELEGRAM_API_URL"]))
    bot = Bot(os.environ["BOT_TOKEN"], session=session)
    dp = Dispatcher()  # FSM storage: aiogram's MemoryStorage
    module = os.environ.get("BOT_MODULE")
    if module:
        sys.path.insert(0, REPOSITORY)
        dp.include_router(importlib.import_module(module).router)
    else:
        dp.include_router(router)
    await dp.start_polling(bot, polling_timeout=int(os.environ.get("POLLING_TIMEOUT", "10")))


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(main())
