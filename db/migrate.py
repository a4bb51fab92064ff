"""Alembic, driven from code: the app runs `upgrade` on every open, so no alembic.ini exists.

To write a new revision against a scratch database:

    from alembic import command
    from db.migrate import alembic_config
    command.revision(alembic_config("sqlite:////tmp/scratch.db"), "what changed", autogenerate=True)

(upgrade the scratch database to head first, then edit the generated file so it does not import
db.schema: a revision must keep meaning the same thing after the models change).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str | None = None) -> Config:
    """A config found from this package, not the cwd, so any process can migrate."""
    config = Config()
    # Config values go through configparser interpolation: a literal % must be doubled.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(connection: Connection) -> None:
    """Bring the database to head inside the caller's transaction (a no-op when already there)."""
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
