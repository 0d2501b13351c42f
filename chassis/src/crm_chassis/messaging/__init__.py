"""Events over RabbitMQ: envelope, topology, transactional outbox and relay, idempotent consumer."""
