"""customer-svc: owns people and organisations (the customer master record)."""
