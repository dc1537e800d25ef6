"""Who leads: the lock policy, its mechanisms (file, PostgreSQL), the lease and the controller."""
