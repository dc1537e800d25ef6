"""python-telegram-bot with its ``AIORateLimiter(max_retries=5)``: the field's send limiter.

The /ping handler as bot.py's (a reply to the message), updates handled concurrently (PTB's
``concurrent_updates``: what a bot that answers many chats at once configures). Reads
``BOT_TOKEN``, ``TELEGRAM_API_URL`` and ``POLLING_TIMEOUT`` like solobot; SIGTERM stops it.
"""

from __future__ import annotations

import logging
import os

from telegram import Update
from telegram.ext import AIORateLimiter, Application, CommandHandler, ContextTypes

#: As the issue measured it: AIORateLimiter's retries on 429 before it gives up.
MAX_RETRIES = 5


async def ping(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    if update.message is not None:
        await update.message.reply_text("pong", do_quote=True)


def main() -> None:
    api = os.environ["TELEGRAM_API_URL"].rstrip("/")
    app = (Application.builder().token(os.environ["BOT_TOKEN"]).base_url(f"{api}/bot")
           .rate_limiter(AIORateLimiter(max_retries=MAX_RETRIES)).concurrent_updates(True).build())
    app.add_handler(CommandHandler("ping", ping))
    app.run_polling(timeout=int(os.environ.get("POLLING_TIMEOUT", "10")), allowed_updates=["message"])


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
