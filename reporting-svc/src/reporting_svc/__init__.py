"""reporting-svc: read models (projections) built from the other services' events."""


def PROJECTIONS():  # noqa: N802  (a constant, made on first use to avoid an import cycle)
    """Every projection of the service (each a part in __main__.PARTS)."""
    from . import campaigns, loyalty, projections, sales, segments, support, timeline, value

    return [
        projections.PROJECTION,
        sales.PROJECTION,
        support.PROJECTION,
        value.PROJECTION,
        loyalty.PROJECTION,
        *campaigns.PROJECTIONS,
        *segments.PROJECTIONS,
        *timeline.PROJECTIONS,
    ]
