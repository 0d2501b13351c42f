"""sales-svc: leads, opportunities, products, quotes, orders and invoices (a running skeleton: health, reflection, database, migrations, outbox)."""
