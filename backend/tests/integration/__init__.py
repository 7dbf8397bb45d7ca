"""Integration tests: real PostgreSQL (TEST_DATABASE_URL), PgBouncer and throwaway clusters."""
