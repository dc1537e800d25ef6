"""Running it in production: health, metrics, systemd notify, logging, shutdown."""
