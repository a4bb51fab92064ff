"""oomlens storage: the only package that writes SQL. Importing it touches no database."""

from db.engine import default_db_url, open_engine

__all__ = ["default_db_url", "open_engine"]
