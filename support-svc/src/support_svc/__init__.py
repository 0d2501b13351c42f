"""support-svc: the call center: tickets from every channel, business-hours SLAs, push offers with re-offer, calls, answers and surveys."""
