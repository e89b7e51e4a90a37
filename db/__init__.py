"""Database models and sessions (SQLAlchemy 2.x). The schema changes only through Alembic."""
