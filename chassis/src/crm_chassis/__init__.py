"""crm_chassis: the one copy of the plumbing every CRM service shares."""
