"""The webhook baseline: aiogram's own ``SimpleRequestHandler`` with bot.py's /ping handler.

What a new user writes from aiogram's webhook example: an aiohttp app, the handler registered
at the webhook path with ``handle_in_background=True`` (answer 200 at once, handle afterwards:
fast, but an update in flight is lost by kill -9), ``setWebhook`` on startup. No leader: behind a
balancer every replica handles what it receives. Reads ``BOT_TOKEN``, ``TELEGRAM_API_URL``,
``WEBHOOK_URL``, ``WEBHOOK_SECRET`` and ``PORT``; SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from urllib.parse import urlsplit

from aiogram import Bot, Dispatcher, Router
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import TelegramRetryAfter
from aiogram.filters import Command
from aiogram.types import Message
from aiogram.webhook.aiohttp_server import SimpleRequestHandler, setup_application
from aiohttp import web

router = Router(name="ping")


@router.message(Command("ping"))
async def cmd_ping(message: Message) -> None:
    await message.reply("pong")  # as bot.py's /ping


def main() -> None:
    url, secret = os.environ["WEBHOOK_URL"], os.environ["WEBHOOK_SECRET"]
    session = AiohttpSession(api=TelegramAPIServer.from_base(os.environ["TELEGRAM_API_URL"]))
    bot = Bot(os.environ["BOT_TOKEN"], session=session)
    dp = Dispatcher()
    dp.include_router(router)

    async def on_startup(bot: Bot) -> None:
        # Two replicas start together; setWebhook is rate-limited (429 with retry_after): wait, retry.
        while True:
            try:
                await bot.set_webhook(url, secret_token=secret, allowed_updates=dp.resolve_used_update_types())
                return
            except TelegramRetryAfter as exc:
                await asyncio.sleep(exc.retry_after)

    dp.startup.register(on_startup)
    app = web.Application()
    SimpleRequestHandler(dispatcher=dp, bot=bot, secret_token=secret, handle_in_background=True).register(
        app, path=urlsplit(url).path)
    setup_application(app, dp, bot=bot)
    web.run_app(app, host="127.0.0.1", port=int(os.environ["PORT"]), print=None, access_log=None)


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
