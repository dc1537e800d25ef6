"""The lifecycle kit of solobot: one concern per module (see docs/architecture.md)."""
