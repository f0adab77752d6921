"""Security tests: transport security, identity, tenants, quotas and limits under abuse."""
