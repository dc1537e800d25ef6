"""What the bot sends: Telegram's flood limits kept on the way out (pure plan, aiogram middleware)."""
