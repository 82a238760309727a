"""Database: typed models, engines and sessions, migrations (``autowisp/db/migrations``)."""
