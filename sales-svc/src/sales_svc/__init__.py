"""sales-svc: leads, pipelines, opportunities, activities, quotes, orders, invoices and forecasts."""
