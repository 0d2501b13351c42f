"""support-svc: tickets, agents, SLAs, calls and surveys (a running skeleton: health, reflection, database, migrations, outbox)."""
