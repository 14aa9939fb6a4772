"""The ledger: jobs, their per-image states and results, in one SQL database."""
