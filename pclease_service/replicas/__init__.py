"""This process as one replica among those sharing the database: its id, its heartbeat,
whether it drains, and the fleet-wide shutdown flag (see ``docs/replicas.md``)."""
