"""The service database: schema, engine and migrations."""
