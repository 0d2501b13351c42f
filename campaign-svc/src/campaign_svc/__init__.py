"""campaign-svc: segments, campaigns, deliveries, consent and loyalty (a running skeleton: health, reflection, database, migrations, outbox)."""
