"""The database: tables, engines and schema, the job state machine, queries, leases, search."""
