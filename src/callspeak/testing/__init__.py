"""Stand-ins for the services callspeak talks to, for tests, benchmarks and demos.

Nothing in here is imported by the production code paths; real clients reach these servers only
through the same base-URL settings a user would change.
"""
