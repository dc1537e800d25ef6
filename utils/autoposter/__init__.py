"""The channel autoposter: the role that publishes on schedule, and its pure schedule arithmetic."""
