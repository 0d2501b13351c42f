-- DEV ONLY: one role and one database per service, matching the *-db-app Secrets.
CREATE ROLE customer_svc LOGIN PASSWORD 'dev-customer-svc';
CREATE DATABASE customer_svc OWNER customer_svc;
CREATE ROLE sales_svc LOGIN PASSWORD 'dev-sales-svc';
CREATE DATABASE sales_svc OWNER sales_svc;
CREATE ROLE support_svc LOGIN PASSWORD 'dev-support-svc';
CREATE DATABASE support_svc OWNER support_svc;
CREATE ROLE campaign_svc LOGIN PASSWORD 'dev-campaign-svc';
CREATE DATABASE campaign_svc OWNER campaign_svc;
CREATE ROLE reporting_svc LOGIN PASSWORD 'dev-reporting-svc';
CREATE DATABASE reporting_svc OWNER reporting_svc;
