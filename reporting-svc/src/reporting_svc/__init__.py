"""reporting-svc: read models (projections) built from the other services' events."""
