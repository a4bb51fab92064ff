"""Alembic environment: migrates the connection `db.migrate.upgrade` hands over, or a URL.

No fileConfig here: the application owns logging, and a migration must not reconfigure it.
"""

from alembic import context
from sqlalchemy import create_engine

from db.schema import Base


def _configure(**kwargs) -> None:
    # Batch mode lets later revisions ALTER tables on SQLite, which has almost no ALTER TABLE.
    context.configure(target_metadata=Base.metadata, render_as_batch=True, **kwargs)
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    from db.engine import default_db_url

    return context.config.get_main_option("sqlalchemy.url") or default_db_url()


connection = context.config.attributes.get("connection")
if connection is not None:
    _configure(connection=connection)
elif context.is_offline_mode():
    _configure(url=_url(), literal_binds=True)
else:
    # Revision authoring (`db.migrate.alembic_config` + `alembic.command`): a plain engine, so
    # that opening it does not itself run the migrations being written.
    engine = create_engine(_url())
    with engine.connect() as conn:
        _configure(connection=conn)
    engine.dispose()
