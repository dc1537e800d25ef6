"""Updates from Telegram to handlers: fetching, the durable inbox, per-chat workers."""
