"""Example bots that solobot runs through BOT_MODULE (see each package's docstring)."""
